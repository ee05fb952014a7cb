"""airlock's MCP server driven by the official python `mcp` client, as an
agent's host would: over Streamable HTTP (`/mcp` of a running server) or
over stdio (`airlock mcp`), chosen by MCP_TRANSPORT.

Environment: AIRLOCK_URL, AIRLOCK_API_KEY, AIRLOCK_OTHER_KEY (another
tenant's key), AIRLOCK_BIN (the airlock binary, for stdio).
"""

import base64
import contextlib
import os
import unittest

import httpx2
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

URL = os.environ["AIRLOCK_URL"]
KEY = os.environ["AIRLOCK_API_KEY"]
OTHER = os.environ["AIRLOCK_OTHER_KEY"]
TRANSPORT = os.environ["MCP_TRANSPORT"]

TOOLS = [
    "sandbox_run",
    "sandbox_create",
    "sandbox_list",
    "sandbox_exec",
    "sandbox_fs_read",
    "sandbox_fs_write",
    "sandbox_fs_list",
    "sandbox_snapshot",
    "sandbox_kill",
]


@contextlib.asynccontextmanager
async def connect(key):
    """An initialized MCP session with the server as the tenant of `key`."""
    if TRANSPORT == "http":
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {key}"}, timeout=180
        ) as http:
            async with streamable_http_client(f"{URL}/mcp", http_client=http) as (r, w):
                async with ClientSession(r, w) as s:
                    yield s, await s.initialize()
    else:
        params = StdioServerParameters(
            command=os.environ["AIRLOCK_BIN"],
            args=["mcp", "--server", URL],
            env={"AIRLOCK_API_KEY": key, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        async with stdio_client(params) as (r, w):
            async with ClientSession(r, w) as s:
                yield s, await s.initialize()


async def call(s, tool, args):
    """A tool call's structured result, asserted not to be an error."""
    r = await s.call_tool(tool, args)
    assert not r.is_error, (tool, args, r.content)
    return r.structured_content


async def refused(s, tool, args):
    """A tool call's error text, asserted to be an error."""
    r = await s.call_tool(tool, args)
    assert r.is_error, (tool, args, r)
    return r.content[0].text


class McpTools(unittest.IsolatedAsyncioTestCase):
    async def test_server_and_tools(self):
        async with connect(KEY) as (s, init):
            self.assertEqual(init.server_info.name, "airlock")
            self.assertIn("/workspace", init.instructions)
            tools = (await s.list_tools()).tools
            self.assertEqual([t.name for t in tools], TOOLS)
            for t in tools:
                self.assertEqual(t.input_schema["type"], "object", t.name)
                self.assertFalse(t.input_schema["additionalProperties"], t.name)
            read = next(t for t in tools if t.name == "sandbox_fs_read")
            self.assertTrue(read.annotations.read_only_hint)

    async def test_run_once(self):
        async with connect(KEY) as (s, _):
            r = await call(s, "sandbox_run", {"language": "python", "code": "print(6 * 7)"})
            self.assertEqual((r["stdout"], r["exit_code"], r["reason"]), ("42\n", 0, "exited"))
            self.assertTrue(r["execution_id"].startswith("ex_"))
            # A program that fails is a result, with its status.
            r = await call(s, "sandbox_run", {"language": "shell", "code": "echo no >&2; exit 3"})
            self.assertEqual((r["stderr"], r["exit_code"]), ("no\n", 3))
            r = await call(
                s,
                "sandbox_run",
                {"language": "javascript", "code": "process.stdin.on('data', d => process.stdout.write(String(d).toUpperCase()))", "stdin": "abc"},
            )
            self.assertEqual(r["stdout"], "ABC")
            # A limit ends it, and says so.
            r = await call(
                s,
                "sandbox_run",
                {"language": "python", "code": "while True: pass", "timeout_ms": 300},
            )
            self.assertEqual(r["reason"], "timeout")
            # Arguments are checked before anything runs.
            text = await refused(s, "sandbox_run", {"language": "python", "code": "1", "sudo": True})
            self.assertIn("unknown field `sudo`", text)
            text = await refused(s, "sandbox_run", {"language": "cobol", "code": "1"})
            self.assertIn("unknown variant `cobol`", text)
            # The API's own refusals come back with their stable code.
            text = await refused(
                s, "sandbox_run", {"language": "python", "code": "1", "env": {"LD_PRELOAD": "/x.so"}}
            )
            self.assertTrue(text.startswith("invalid_request:"), text)

    async def test_session_files_exec_snapshot_kill(self):
        async with connect(KEY) as (s, _):
            ses = await call(s, "sandbox_create", {"language": "python", "idle_timeout_secs": 120})
            sid = ses["session_id"]
            self.assertEqual((ses["status"], ses["language"]), ("open", "python"))
            main = "print(open('data.txt').read().upper())\n"
            w = await call(s, "sandbox_fs_write", {"session_id": sid, "path": "app/main.py", "content": main})
            self.assertEqual((w["path"], w["type"], w["size"]), ("app/main.py", "file", len(main)))
            # /workspace/... is the same file as seen from inside.
            await call(s, "sandbox_fs_write", {"session_id": sid, "path": "/workspace/data.txt", "content": "hello"})
            r = await call(s, "sandbox_exec", {"session_id": sid, "command": "python3 app/main.py && pwd"})
            self.assertEqual((r["stdout"], r["exit_code"]), ("HELLO\n/workspace\n", 0))
            self.assertEqual(r["session_id"], sid)
            # Code in the session's language; what it writes persists.
            r = await call(s, "sandbox_exec", {"session_id": sid, "code": "open('out.bin','wb').write(bytes(range(256)))"})
            self.assertEqual(r["exit_code"], 0)
            got = await call(s, "sandbox_fs_read", {"session_id": sid, "path": "out.bin"})
            self.assertEqual((got["encoding"], got["size"]), ("base64", 256))
            self.assertEqual(base64.b64decode(got["content"]), bytes(range(256)))
            got = await call(s, "sandbox_fs_read", {"session_id": sid, "path": "data.txt"})
            self.assertEqual((got["encoding"], got["content"]), ("utf8", "hello"))
            # Bytes written as base64 arrive exact; mode applies.
            blob = bytes([0, 255, 10, 13]) * 10
            await call(
                s,
                "sandbox_fs_write",
                {"session_id": sid, "path": "bin/run.sh", "content": base64.b64encode(b"#!/bin/sh\necho ran\n").decode(), "encoding": "base64", "mode": "755"},
            )
            await call(s, "sandbox_fs_write", {"session_id": sid, "path": "blob", "content": base64.b64encode(blob).decode(), "encoding": "base64"})
            r = await call(s, "sandbox_exec", {"session_id": sid, "command": "./bin/run.sh; od -An -tx1 blob | head -1"})
            self.assertEqual(r["stdout"].split("\n")[0], "ran")
            self.assertEqual(r["stdout"].split()[1:5], ["00", "ff", "0a", "0d"])
            ls = await call(s, "sandbox_fs_list", {"session_id": sid})
            names = {e["name"]: e["type"] for e in ls["entries"]}
            self.assertEqual(names, {"app": "directory", "bin": "directory", "data.txt": "file", "out.bin": "file", "blob": "file"})
            ls = await call(s, "sandbox_fs_list", {"session_id": sid, "path": "bin"})
            self.assertEqual([(e["name"], e["mode"]) for e in ls["entries"]], [("run.sh", 0o755)])
            # Paths cannot leave the workspace.
            text = await refused(s, "sandbox_fs_read", {"session_id": sid, "path": "../../etc/passwd"})
            self.assertTrue(text.startswith("invalid_path:"), text)
            text = await refused(s, "sandbox_fs_read", {"session_id": sid, "path": "/etc/passwd"})
            self.assertIn("files are inside /workspace", text)
            r = await call(s, "sandbox_exec", {"session_id": sid, "command": "ln -s /etc/passwd leak"})
            text = await refused(s, "sandbox_fs_read", {"session_id": sid, "path": "leak"})
            self.assertIn("not a regular file", text)
            text = await refused(s, "sandbox_fs_read", {"session_id": sid, "path": "app"})
            self.assertIn("is a directory", text)
            text = await refused(s, "sandbox_fs_read", {"session_id": sid, "path": "nothing"})
            self.assertTrue(text.startswith("file_not_found:"), text)
            # Too large for a model's context: refused, with the way out.
            await call(s, "sandbox_exec", {"session_id": sid, "command": "head -c 1100000 /dev/zero > big"})
            text = await refused(s, "sandbox_fs_read", {"session_id": sid, "path": "big"})
            self.assertIn("1100000 bytes", text)
            text = await refused(s, "sandbox_exec", {"session_id": sid, "command": "true", "code": "1"})
            self.assertIn("not both", text)
            snap = await call(s, "sandbox_snapshot", {"session_id": sid})
            self.assertTrue(snap["id"].startswith("sn_"), snap)
            self.assertEqual((snap["reason"], snap["entries"]), ("requested", 9))
            self.assertEqual(snap["session_id"], sid)
            listed = await call(s, "sandbox_list", {})
            self.assertIn(sid, [x["id"] for x in listed["sessions"]])
            # Another tenant sees none of it, on any tool.
            async with connect(OTHER) as (o, _):
                for tool, args in [
                    ("sandbox_fs_read", {"session_id": sid, "path": "data.txt"}),
                    ("sandbox_fs_write", {"session_id": sid, "path": "x", "content": "x"}),
                    ("sandbox_fs_list", {"session_id": sid}),
                    ("sandbox_exec", {"session_id": sid, "command": "true"}),
                    ("sandbox_snapshot", {"session_id": sid}),
                    ("sandbox_kill", {"session_id": sid}),
                ]:
                    text = await refused(o, tool, args)
                    self.assertTrue(text.startswith("not_found:"), (tool, text))
                listed = await call(o, "sandbox_list", {})
                self.assertNotIn(sid, [x["id"] for x in listed["sessions"]])
            # The session still works for its owner (the other tenant's
            # kill did nothing), then ends.
            got = await call(s, "sandbox_fs_read", {"session_id": sid, "path": "data.txt"})
            self.assertEqual(got["content"], "hello")
            self.assertEqual(await call(s, "sandbox_kill", {"session_id": sid}), {"session_id": sid, "ended": True})
            text = await refused(s, "sandbox_exec", {"session_id": sid, "command": "true"})
            self.assertTrue(text.startswith("session_ended:"), text)
            # A new session from the snapshot has its files.
            ses2 = await call(s, "sandbox_create", {"from_snapshot": snap["id"]})
            got = await call(s, "sandbox_fs_read", {"session_id": ses2["session_id"], "path": "data.txt"})
            self.assertEqual(got["content"], "hello")
            await call(s, "sandbox_kill", {"session_id": ses2["session_id"]})


if __name__ == "__main__":
    unittest.main()
