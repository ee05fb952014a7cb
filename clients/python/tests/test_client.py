"""The client against a real airlock server (started by the Rust test
`server::sdk::python_client_passes_its_tests_against_a_real_server`, which
sets AIRLOCK_URL, AIRLOCK_API_KEY and AIRLOCK_OTHER_KEY)."""

import asyncio
import hashlib
import io
import json
import os
import tarfile
import unittest

import airlock
from airlock import Airlock, AsyncAirlock


def key(name="AIRLOCK_API_KEY"):
    v = os.environ.get(name)
    if not v:
        raise unittest.SkipTest(f"{name} is not set: run through the Rust test")
    return v


class OneShot(unittest.TestCase):
    def setUp(self):
        self.c = Airlock(os.environ.get("AIRLOCK_URL"), key())

    def tearDown(self):
        self.c.close()

    def test_run_returns_the_record(self):
        r = self.c.run("import sys; print(6*7); sys.exit(3)")
        self.assertEqual((r.status, r.reason, r.exit_code, r.stdout), ("finished", "exited", 3, "42\n"))
        self.assertEqual(r.result["enforced"]["backend"], "process")
        self.assertEqual(self.c.executions.get(r.id).stdout, "42\n")

    def test_output_streams_as_it_happens(self):
        seen = []
        r = self.c.run(
            "for i in 1 2 3; do echo line$i; done; echo err >&2",
            language="shell",
            on_stdout=seen.append,
            on_stderr=lambda t: seen.append("E:" + t),
        )
        self.assertEqual(r.exit_code, 0)
        self.assertEqual("".join(x for x in seen if not x.startswith("E:")), "line1\nline2\nline3\n")
        self.assertIn("E:err\n", seen)

    def test_errors_are_raised_from_problem_documents(self):
        with self.assertRaises(airlock.InvalidRequestError) as e:
            self.c.run("print(1)", language="cobol")
        self.assertEqual((e.exception.status, e.exception.code), (400, "invalid_request"))
        self.assertTrue(e.exception.request_id)
        with self.assertRaises(airlock.PolicyDeniedError) as e:
            self.c.run("print(1)", limits={"memory_mib": 1 << 20})
        self.assertEqual(e.exception.code, "policy_denied")
        with self.assertRaises(airlock.NotFoundError):
            self.c.executions.get("ex_" + "0" * 32)
        with Airlock(os.environ.get("AIRLOCK_URL"), "alk_bad") as bad:
            with self.assertRaises(airlock.AuthenticationError):
                bad.run("print(1)")

    def test_evidence_digest_checks_out(self):
        r = self.c.run("print('evidence')")
        ev = self.c.executions.evidence(r.id)
        body = json.dumps(ev["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self.assertEqual(hashlib.sha256(body.encode()).hexdigest(), ev["digest"])
        self.assertEqual(ev["anchor"]["kind"], "evidence.issue")


class Sessions(unittest.TestCase):
    def setUp(self):
        self.c = Airlock(os.environ.get("AIRLOCK_URL"), key())

    def tearDown(self):
        self.c.close()

    def test_a_session_keeps_files_across_executions_and_ends_with_the_block(self):
        with self.c.sessions.create(language="python", snapshot_after_exec=True) as s:
            info = s.files.write("in/data.csv", "a,b\n1,2\n3,4\n")
            self.assertEqual((info.type, info.size), ("file", 12))
            r = s.exec("import csv; rows = list(csv.reader(open('in/data.csv'))); open('out.txt', 'w').write(str(len(rows)))")
            self.assertEqual(r.exit_code, 0, r.raw)
            self.assertEqual(r.session_id, s.id)
            self.assertEqual(s.files.read_text("out.txt"), "3")
            ls = s.exec(argv=["ls", "in"])
            self.assertEqual(ls.stdout, "data.csv\n")
            self.assertEqual([f.name for f in s.files.list()], ["in", "out.txt"])
            self.assertEqual(s.files.stat("in").type, "directory")
            s.files.write("bin.dat", bytes(range(256)), mode=0o600)
            self.assertEqual(s.files.read("bin.dat"), bytes(range(256)))
            self.assertEqual(s.files.stat("bin.dat").mode, 0o600)
            s.files.remove("bin.dat")
            with self.assertRaises(airlock.NotFoundError) as e:
                s.files.read("bin.dat")
            self.assertEqual(e.exception.code, "file_not_found")
            with self.assertRaises(airlock.InvalidRequestError) as e:
                s.files.read("../../etc/passwd")
            self.assertEqual(e.exception.code, "invalid_path")
            # Snapshots: one after each execution; a tar of the workspace.
            snaps = s.snapshots()
            self.assertEqual([x.reason for x in snaps], ["after_exec", "after_exec"])
            manual = s.snapshot()
            self.assertEqual(manual.reason, "requested")
            d = self.c.snapshots.diff(manual.id, snaps[0].id)
            self.assertEqual(d["added"], [])
            tar = tarfile.open(fileobj=io.BytesIO(self.c.snapshots.tar(manual.id)))
            self.assertEqual(sorted(tar.getnames()), ["in", "in/data.csv", "out.txt"])
            sid = s.id
            self.assertEqual(s.evidence()["body"]["kind"], "session")
        # Ended on leaving the block.
        ended = self.c.sessions.get(sid)
        self.assertEqual((ended.info.status, ended.info.end_reason), ("ended", "deleted"))
        with self.assertRaises(airlock.SessionEndedError):
            ended.exec("print(1)")
        # Restored from the last snapshot into a new session.
        with self.c.sessions.create(from_snapshot=manual.id) as again:
            self.assertEqual(again.files.read_text("out.txt"), "3")

    def test_another_tenant_cannot_reach_the_session(self):
        other = Airlock(os.environ.get("AIRLOCK_URL"), key("AIRLOCK_OTHER_KEY"))
        with self.c.sessions.create() as s:
            s.files.write("secret.txt", "mine")
            with self.assertRaises(airlock.NotFoundError):
                other.sessions.get(s.id)
            with self.assertRaises(airlock.NotFoundError):
                airlock.SessionHandle(other, s.info).files.read("secret.txt")
            self.assertEqual(s.files.read_text("secret.txt"), "mine")
        other.close()


class Async(unittest.TestCase):
    def test_the_async_client_runs_and_holds_sessions(self):
        async def main():
            async with AsyncAirlock(os.environ.get("AIRLOCK_URL"), key()) as c:
                r, r2 = await asyncio.gather(c.run("print(1)"), c.run("echo two", language="shell"))
                self.assertEqual((r.stdout, r2.stdout), ("1\n", "two\n"))
                seen = []
                await c.run("print('live')", on_stdout=seen.append)
                self.assertEqual("".join(seen), "live\n")
                async with await c.sessions.create(language="shell") as s:
                    await s.files.write("f", "async")
                    out = await s.exec("cat f")
                    self.assertEqual(out.stdout, "async")
                    self.assertEqual([f.name for f in await s.files.list()], ["f"])
                    snap = await s.snapshot()
                    self.assertEqual(snap.entries, 1)

        asyncio.run(main())


if __name__ == "__main__":
    unittest.main()
