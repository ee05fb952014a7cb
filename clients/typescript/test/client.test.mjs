// The client against a real airlock server (started by the Rust test
// `server::sdk::typescript_client_passes_its_tests_against_a_real_server`,
// which sets AIRLOCK_URL, AIRLOCK_API_KEY and AIRLOCK_OTHER_KEY).

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { Airlock, AirlockError } from "../index.js";

const url = process.env.AIRLOCK_URL;
const key = process.env.AIRLOCK_API_KEY;
const skip = !url || !key ? "AIRLOCK_URL and AIRLOCK_API_KEY are not set: run through the Rust test" : false;

test("run returns the record", { skip }, async () => {
  const c = new Airlock({ url, apiKey: key });
  const r = await c.run("import sys; print(6*7); sys.exit(3)");
  assert.equal(r.status, "finished");
  assert.equal(r.reason, "exited");
  assert.equal(r.result.exit_code, 3);
  assert.equal(r.result.stdout, "42\n");
  assert.equal((await c.executions.get(r.id)).id, r.id);
});

test("output streams as it happens", { skip }, async () => {
  const c = new Airlock({ url, apiKey: key });
  const out = [];
  const err = [];
  const r = await c.run("for i in 1 2 3; do echo line$i; done; echo oops >&2", {
    language: "shell",
    onStdout: (t) => out.push(t),
    onStderr: (t) => err.push(t),
  });
  assert.equal(r.result.exit_code, 0);
  assert.equal(out.join(""), "line1\nline2\nline3\n");
  assert.equal(err.join(""), "oops\n");
});

test("errors carry the problem document's code", { skip }, async () => {
  const c = new Airlock({ url, apiKey: key });
  await assert.rejects(c.run("x", { language: "cobol" }), (e) => e instanceof AirlockError && e.status === 400 && e.code === "invalid_request" && !!e.requestId);
  await assert.rejects(c.executions.get(`ex_${"0".repeat(32)}`), (e) => e.status === 404 && e.code === "not_found");
  const bad = new Airlock({ url, apiKey: "alk_bad" });
  await assert.rejects(bad.run("print(1)"), (e) => e.status === 401 && e.code === "unauthorized");
});

test("a session keeps files across executions, snapshots them and ends", { skip }, async () => {
  const c = new Airlock({ url, apiKey: key });
  const s = await c.sessions.create({ language: "python", snapshot_after_exec: true });
  try {
    const f = await s.files.write("in/data.csv", "a,b\n1,2\n");
    assert.deepEqual([f.type, f.size], ["file", 8]);
    const r = await s.exec({ code: "print(len(open('in/data.csv').read().splitlines()))" });
    assert.equal(r.result.stdout, "2\n");
    assert.equal(r.session_id, s.id);
    const ls = await s.exec({ argv: ["ls", "in"] });
    assert.equal(ls.result.stdout, "data.csv\n");
    await s.files.write("bin", new Uint8Array([0, 1, 2, 255]), { mode: 0o600 });
    assert.deepEqual([...(await s.files.read("bin"))], [0, 1, 2, 255]);
    assert.equal((await s.files.stat("bin")).mode, 0o600);
    assert.deepEqual((await s.files.list()).map((e) => e.name), ["bin", "in"]);
    await s.files.remove("bin");
    await assert.rejects(s.files.read("bin"), (e) => e.status === 404 && e.code === "file_not_found");
    await assert.rejects(s.files.read("../../etc/passwd"), (e) => e.status === 400 && e.code === "invalid_path");
    const snaps = await s.snapshots();
    assert.deepEqual(snaps.map((x) => x.reason), ["after_exec", "after_exec"]);
    const manual = await s.snapshot();
    const d = await c.snapshots.diff(manual.id, snaps[0].id);
    assert.deepEqual(d.added, []);
    const tar = await c.snapshots.tar(manual.id);
    assert.ok(tar.length >= 1024 && tar.length % 512 === 0, `a tar archive: ${tar.length} bytes`);
    const ev = await s.evidence();
    const body = JSON.stringify(sortKeys(ev.body));
    assert.equal(createHash("sha256").update(body).digest("hex"), ev.digest);
  } finally {
    await s.kill();
  }
  const ended = await c.sessions.get(s.id);
  assert.equal(ended.info.status, "ended");
  assert.equal(ended.info.end_reason, "deleted");
  await assert.rejects(ended.exec({ code: "print(1)" }), (e) => e.status === 409 && e.code === "session_ended");
});

test("another tenant cannot reach the session", { skip }, async () => {
  const c = new Airlock({ url, apiKey: key });
  const other = new Airlock({ url, apiKey: process.env.AIRLOCK_OTHER_KEY });
  const s = await c.sessions.create();
  try {
    await s.files.write("secret.txt", "mine");
    await assert.rejects(other.sessions.get(s.id), (e) => e.status === 404);
    assert.equal(await s.files.readText("secret.txt"), "mine");
  } finally {
    await s.kill();
  }
});

// The record types of index.d.ts name exactly the properties the server's
// OpenAPI document gives each schema.
test("index.d.ts is in step with /openapi.json", { skip }, async () => {
  const doc = await (await fetch(`${url}/openapi.json`)).json();
  const dts = readFileSync(new URL("../index.d.ts", import.meta.url), "utf8");
  for (const name of ["ExecutionView", "SessionView", "WorkspaceView", "FileView", "ManifestEntry", "SnapshotView", "SnapshotDiff", "Evidence"]) {
    const schema = doc.components.schemas[name];
    assert.ok(schema, `${name} in the OpenAPI document`);
    assert.deepEqual(declared(dts, name), Object.keys(schema.properties).sort(), name);
  }
});

function declared(dts, name) {
  const start = dts.indexOf(`export interface ${name} {`);
  assert.ok(start >= 0, `${name} in index.d.ts`);
  const props = [];
  let depth = 0;
  for (const line of dts.slice(start).split("\n")) {
    if (depth === 1) {
      const m = /^\s+(\w+)\??:/.exec(line);
      if (m) props.push(m[1]);
    }
    for (const ch of line) {
      if (ch === "{") depth += 1;
      if (ch === "}") depth -= 1;
    }
    if (depth === 0 && props.length) break;
  }
  return props.sort();
}

function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === "object") {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])]));
  }
  return v;
}
