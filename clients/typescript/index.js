// The airlock client for JavaScript and TypeScript (types: index.d.ts).
// No runtime dependencies: the platform's fetch, TextDecoder and streams
// (node 18+, browsers, deno, bun).

/** An error the server answered, from its problem document. */
export class AirlockError extends Error {
  constructor(status, code, detail, requestId) {
    super(`${status} ${code}: ${detail}`);
    this.name = "AirlockError";
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.requestId = requestId;
  }
}

async function errorFrom(res) {
  const text = await res.text();
  let code = "error";
  let detail = text.slice(0, 200);
  try {
    const doc = JSON.parse(text);
    code = String(doc.code ?? code);
    detail = String(doc.detail ?? "");
  } catch {
    // not a problem document: keep the text
  }
  return new AirlockError(res.status, code, detail, res.headers.get("x-request-id") ?? undefined);
}

function filePath(p) {
  // URL parsing removes `.` and `..` segments (and their %2E forms): a
  // `..` would ask for another path than the one given, so it is refused
  // here as the server refuses it; `.` and empty segments mean nothing.
  const parts = p.split("/").filter((s) => s !== "" && s !== ".");
  if (parts.includes("..")) {
    throw new AirlockError(400, "invalid_path", "invalid path: `..` is not allowed", undefined);
  }
  return parts.map(encodeURIComponent).join("/");
}

function dropUndefined(o) {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined && v !== null));
}

/** Events from a text/event-stream body. */
export async function* parseSse(body) {
  const decoder = new TextDecoder();
  let buf = "";
  let kind = "message";
  let data = [];
  const flush = function* () {
    if (data.length) {
      const text = data.join("\n");
      let value;
      try {
        value = JSON.parse(text);
      } catch {
        value = text;
      }
      yield { kind, data: value };
    }
    kind = "message";
    data = [];
  };
  for await (const chunk of body) {
    buf += decoder.decode(chunk, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (line === "") {
        yield* flush();
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const name = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? "" : line.slice(i + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "event") kind = value;
        else if (name === "data") data.push(value);
      }
    }
  }
  yield* flush();
}

/** A client of one airlock server for one tenant's key. */
export class Airlock {
  constructor({ url, apiKey, fetch: f } = {}) {
    const env = typeof process !== "undefined" ? process.env : {};
    this.url = (url ?? env.AIRLOCK_URL ?? "http://127.0.0.1:7070").replace(/\/+$/, "");
    const key = apiKey ?? env.AIRLOCK_API_KEY;
    if (!key) throw new Error("an API key is required (apiKey or AIRLOCK_API_KEY)");
    this._auth = `Bearer ${key}`;
    this._fetch = f ?? globalThis.fetch.bind(globalThis);
    this.executions = new Executions(this);
    this.sessions = new Sessions(this);
    this.snapshots = new Snapshots(this);
  }

  async _request(method, path, { json, body, query, headers } = {}) {
    let url = this.url + path;
    if (query) {
      const q = new URLSearchParams(dropUndefined(query));
      if ([...q].length) url += `?${q}`;
    }
    const h = { Authorization: this._auth, ...headers };
    let payload = body;
    if (json !== undefined) {
      h["Content-Type"] = "application/json";
      payload = JSON.stringify(json);
    }
    const res = await this._fetch(url, { method, headers: h, body: payload });
    if (res.status >= 400) throw await errorFrom(res);
    return res;
  }

  async _json(method, path, opts) {
    const res = await this._request(method, path, opts);
    const text = await res.text();
    return text ? JSON.parse(text) : undefined;
  }

  async _run(path, body, { onStdout, onStderr } = {}) {
    if (!onStdout && !onStderr) return this._json("POST", path, { json: body });
    const started = await this._json("POST", path, { json: { ...body, wait: false } });
    for await (const ev of this.executions.events(started.id)) {
      if (ev.kind === "stdout" && onStdout) onStdout(ev.data.data);
      else if (ev.kind === "stderr" && onStderr) onStderr(ev.data.data);
      else if (ev.kind === "finished") break;
    }
    return this.executions.get(started.id);
  }

  /** Runs code in a fresh sandbox and returns its record. */
  run(code, { language = "python", onStdout, onStderr, ...fields } = {}) {
    return this._run("/v1/executions", dropUndefined({ language, code, ...fields }), { onStdout, onStderr });
  }
}

class Executions {
  constructor(c) {
    this._c = c;
  }
  get(id) {
    return this._c._json("GET", `/v1/executions/${encodeURIComponent(id)}`);
  }
  async list({ limit } = {}) {
    return (await this._c._json("GET", "/v1/executions", { query: { limit } })).executions;
  }
  async cancel(id) {
    await this._c._request("POST", `/v1/executions/${encodeURIComponent(id)}/cancel`);
  }
  /** The execution's events, live while it runs (replayed after). */
  async *events(id) {
    const res = await this._c._request("GET", `/v1/executions/${encodeURIComponent(id)}/events`, {
      headers: { Accept: "text/event-stream" },
    });
    yield* parseSse(res.body);
  }
  evidence(id) {
    return this._c._json("GET", `/v1/executions/${encodeURIComponent(id)}/evidence`);
  }
}

class Sessions {
  constructor(c) {
    this._c = c;
  }
  /** A new session; `await using` (or `kill()`) ends it. */
  async create(fields = {}) {
    return new SessionHandle(this._c, await this._c._json("POST", "/v1/sessions", { json: dropUndefined(fields) }));
  }
  async get(id) {
    return new SessionHandle(this._c, await this._c._json("GET", `/v1/sessions/${encodeURIComponent(id)}`));
  }
  async list({ limit } = {}) {
    return (await this._c._json("GET", "/v1/sessions", { query: { limit } })).sessions;
  }
}

class Files {
  constructor(c, id) {
    this._c = c;
    this._base = `/v1/sessions/${encodeURIComponent(id)}`;
  }
  async write(path, data, { mode = 0o644 } = {}) {
    const body = typeof data === "string" ? new TextEncoder().encode(data) : data;
    return this._c._json("PUT", `${this._base}/files/${filePath(path)}`, {
      body,
      query: { mode: mode.toString(8) },
      headers: { "Content-Type": "application/octet-stream" },
    });
  }
  async read(path) {
    const res = await this._c._request("GET", `${this._base}/files/${filePath(path)}`);
    return new Uint8Array(await res.arrayBuffer());
  }
  async readText(path) {
    return new TextDecoder().decode(await this.read(path));
  }
  async list(path = "") {
    return (await this._c._json("GET", `${this._base}/files`, { query: { path } })).entries;
  }
  stat(path) {
    return this._c._json("GET", `${this._base}/stat`, { query: { path } });
  }
  async remove(path) {
    await this._c._request("DELETE", `${this._base}/files/${filePath(path)}`);
  }
}

export class SessionHandle {
  constructor(c, info) {
    this._c = c;
    this.info = info;
    this.id = info.id;
    this.files = new Files(c, info.id);
  }
  /** Runs code (or, with `argv`, a command run as is) in a fresh sandbox
   * whose /workspace is the session's. */
  exec({ onStdout, onStderr, ...fields }) {
    return this._c._run(`/v1/sessions/${encodeURIComponent(this.id)}/exec`, dropUndefined(fields), {
      onStdout,
      onStderr,
    });
  }
  async refresh() {
    this.info = await this._c._json("GET", `/v1/sessions/${encodeURIComponent(this.id)}`);
    return this.info;
  }
  snapshot() {
    return this._c._json("POST", `/v1/sessions/${encodeURIComponent(this.id)}/snapshots`);
  }
  async snapshots() {
    return (await this._c._json("GET", `/v1/sessions/${encodeURIComponent(this.id)}/snapshots`)).snapshots;
  }
  evidence() {
    return this._c._json("GET", `/v1/sessions/${encodeURIComponent(this.id)}/evidence`);
  }
  /** Ends the session: what runs in it is killed, its files go. */
  async kill({ missingOk = false } = {}) {
    try {
      await this._c._request("DELETE", `/v1/sessions/${encodeURIComponent(this.id)}`);
    } catch (e) {
      if (!(missingOk && e instanceof AirlockError && (e.status === 404 || e.status === 409))) throw e;
    }
  }
  async [Symbol.asyncDispose ?? Symbol.for("Symbol.asyncDispose")]() {
    await this.kill({ missingOk: true });
  }
}

class Snapshots {
  constructor(c) {
    this._c = c;
  }
  get(id) {
    return this._c._json("GET", `/v1/snapshots/${encodeURIComponent(id)}`);
  }
  diff(id, against) {
    return this._c._json("GET", `/v1/snapshots/${encodeURIComponent(id)}/diff`, { query: { against } });
  }
  async tar(id) {
    const res = await this._c._request("GET", `/v1/snapshots/${encodeURIComponent(id)}/tar`);
    return new Uint8Array(await res.arrayBuffer());
  }
}
