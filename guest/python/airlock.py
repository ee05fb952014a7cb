"""airlock guest SDK for python: the sandbox's only channel to the platform.

Standard library only. The channel is the socket at descriptor
$AIRLOCK_BROKER_FD; frames are a 4-byte little-endian length followed by
JSON (docs/broker-protocol.md). Identity is fixed by the platform: nothing
sent here can change the tenant, flow or execution.

    import airlock
    ax = airlock.connect()
    ax.log.info("hello", user=42)
    value, found = ax.secrets.get("DB_PASSWORD")
    ax.agent.memory.put("counter", 1)
"""
import collections
import json
import os
import struct
import threading

__all__ = ["connect", "AirlockError", "Airlock"]

MAX_FRAME = 1 << 20

SecretResult = collections.namedtuple("SecretResult", ["value", "found"])
CasResult = collections.namedtuple("CasResult", ["ok", "version"])


class AirlockError(Exception):
    """The broker refused a call (code, message) or the channel failed."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _Channel:
    def __init__(self, fd):
        self._fd = fd
        self._next = 1
        self._lock = threading.Lock()

    def _read_exact(self, n):
        chunks, got = [], 0
        while got < n:
            b = os.read(self._fd, n - got)
            if not b:
                raise AirlockError("closed", "the broker closed the channel")
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def call(self, op, _rid=None, **args):
        with self._lock:
            if _rid is None:
                rid = self._next
                self._next += 1
            else:
                rid = _rid
            # Strict JSON: NaN/Infinity and lone surrogates are errors here,
            # not a frame the broker must refuse (which would close it).
            body = json.dumps({"v": 1, "id": rid, "op": op, "args": args},
                              separators=(",", ":"), allow_nan=False,
                              ensure_ascii=False).encode("utf-8")
            if len(body) > MAX_FRAME:
                raise AirlockError("too_large", "request exceeds the frame limit")
            data = struct.pack("<I", len(body)) + body
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
            (n,) = struct.unpack("<I", self._read_exact(4))
            if n > MAX_FRAME:
                raise AirlockError("protocol", "oversized reply")
            rep = json.loads(self._read_exact(n))
        if rep.get("id") != rid:
            raise AirlockError("protocol", "reply does not match the request")
        if not rep.get("ok"):
            err = rep.get("error") or {}
            raise AirlockError(err.get("code", "error"), err.get("message", ""))
        return rep.get("result")


class _Log:
    def __init__(self, ch):
        self._ch = ch

    def _emit(self, level, message, fields):
        self._ch.call("log", level=level, message=str(message), fields=fields)

    def debug(self, message, **fields):
        self._emit("debug", message, fields)

    def info(self, message, **fields):
        self._emit("info", message, fields)

    def warn(self, message, **fields):
        self._emit("warn", message, fields)

    warning = warn

    def error(self, message, **fields):
        self._emit("error", message, fields)


class _Secrets:
    def __init__(self, ch):
        self._ch = ch

    def get(self, name):
        """(value, found) of one of this tenant's secrets the policy grants."""
        r = self._ch.call("secrets.get", name=name)
        return SecretResult(r.get("value"), bool(r.get("found")))


class _Memory:
    """Durable memory scoped to (tenant, flow)."""

    def __init__(self, ch):
        self._ch = ch

    def get(self, key, default=None):
        r = self._ch.call("memory.get", key=key)
        return r["value"] if r["found"] else default

    def get_versioned(self, key):
        """(value, version); version 0 when absent."""
        r = self._ch.call("memory.get", key=key)
        return r["value"], r["version"]

    def put(self, key, value):
        """Writes unconditionally; returns the new version."""
        return self._ch.call("memory.put", key=key, value=value)["version"]

    def cas(self, key, expected_version, value):
        """Writes only if the current version is expected_version (0: absent)."""
        r = self._ch.call("memory.cas", key=key, expected_version=expected_version, value=value)
        return CasResult(bool(r["ok"]), r["version"])

    def delete(self, key):
        return bool(self._ch.call("memory.delete", key=key)["deleted"])

    def list(self, prefix="", limit=100, after=None):
        args = {"prefix": prefix, "limit": limit}
        if after is not None:
            args["after"] = after
        return [k["key"] for k in self._ch.call("memory.list", **args)["keys"]]


class _Agent:
    def __init__(self, ch):
        self.memory = _Memory(ch)


class Airlock:
    """The `ax` object: context, variables, logs, secrets, agent memory."""

    def __init__(self, ch, hello):
        self._ch = ch
        self.execution_id = hello["execution_id"]
        self.tenant_id = hello["tenant_id"]
        self.flow_id = hello["flow_id"]
        self.trace_id = hello["trace_id"]
        self._variables = hello.get("variables")
        self.input = hello.get("input")
        # Set for a warm (pooled) runner, which receives its code here.
        self._code = hello.get("code")
        self._handler = bool(hello.get("handler"))
        self.log = _Log(ch)
        self.secrets = _Secrets(ch)
        self.agent = _Agent(ch)

    @property
    def variables(self):
        """Config values and granted secrets (read when first needed)."""
        if self._variables is None:
            self._variables = self._ch.call("hello").get("variables") or {}
        return self._variables

    def _report(self, output=None, error=None):
        args = {"error": error} if error is not None else {"output": output}
        self._ch.call("result", **args)


_ax = None


def connect(_warm=False):
    """The execution's `ax` object (one per process)."""
    global _ax
    if _ax is None:
        fd = os.environ.get("AIRLOCK_BROKER_FD")
        if fd is None:
            raise AirlockError("unavailable", "no broker channel in this sandbox")
        ch = _Channel(int(fd))
        # A warm runner's handshake uses the reserved id 0, so the program's
        # own requests start at 1 as they would in a cold sandbox.
        _ax = Airlock(ch, ch.call("hello", _rid=0) if _warm else ch.call("hello"))
    return _ax
