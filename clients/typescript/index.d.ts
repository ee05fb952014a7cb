// Types of the airlock client. The record interfaces mirror the server's
// OpenAPI schemas of the same name (test/client.test.mjs checks every
// property against a running server's /openapi.json).

export class AirlockError extends Error {
  status: number;
  /** Stable code of the problem document (`urn:airlock:problem:<code>`). */
  code: string;
  detail: string;
  requestId?: string;
}

export interface Limits {
  wall_time_ms?: number;
  cpu_time_ms?: number;
  memory_mib?: number;
  pids?: number;
  cpus?: number;
  stdout_bytes?: number;
  stderr_bytes?: number;
  open_files?: number;
}

export type Language = "python" | "javascript" | "shell";

/** OpenAPI: ExecutionView. */
export interface ExecutionView {
  id: string;
  tenant_id: string;
  status: "queued" | "running" | "finished" | "failed";
  language: string;
  reason: string | null;
  error: string | null;
  request_id: string;
  trace_id: string;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  /** exit_code, signal, reason, stdout, stderr, usage, enforced layers. */
  result: {
    exit_code: number | null;
    signal: number | null;
    stdout: string;
    stderr: string;
    reason: string;
    enforced: Record<string, unknown>;
    [k: string]: unknown;
  } | null;
  flow_id: string;
  session_id: string | null;
  output: unknown;
  handler_error: { type: string; message: string; traceback: string | null } | null;
  broker_error: string | null;
  egress: unknown[] | null;
}

/** OpenAPI: WorkspaceView. */
export interface WorkspaceView {
  quota_mib: number;
  quota_files: number;
  used_bytes: number | null;
  used_files: number | null;
}

/** OpenAPI: SessionView. */
export interface SessionView {
  id: string;
  tenant_id: string;
  status: "open" | "ended";
  language: string;
  backend: string;
  isolation: string | null;
  workspace: WorkspaceView;
  running: number | null;
  idle_timeout_secs: number;
  created_at: string;
  expires_at: string;
  ended_at: string | null;
  end_reason: "deleted" | "idle_timeout" | "lifetime" | "server_restart" | "server_shutdown" | "node_lost" | null;
  snapshot_after_exec: boolean;
}

/** OpenAPI: FileView. */
export interface FileView {
  name: string;
  type: "file" | "directory" | "symlink" | "other";
  size: number;
  mode: number;
  modified_at: string;
}

/** OpenAPI: ManifestEntry. */
export interface ManifestEntry {
  path: string;
  type: "file" | "directory" | "symlink" | "other";
  size: number;
  mode: number;
  hash: string | null;
  target: string | null;
}

/** OpenAPI: SnapshotView. */
export interface SnapshotView {
  id: string;
  session_id: string;
  execution_id: string | null;
  reason: "requested" | "after_exec";
  digest: string;
  entries: number;
  bytes: number;
  truncated: boolean;
  created_at: string;
  manifest: ManifestEntry[] | null;
}

/** OpenAPI: SnapshotDiff. */
export interface SnapshotDiff {
  snapshot: string;
  against: string;
  added: ManifestEntry[];
  removed: ManifestEntry[];
  changed: { path: string; before: ManifestEntry; after: ManifestEntry }[];
}

/** OpenAPI: Evidence. */
export interface Evidence {
  body: Record<string, unknown>;
  digest: string;
  anchor: { time: string; kind: string; actor: string; subject: string; request_id: string | null; detail: unknown; hash: string };
}

export interface Event {
  kind: "started" | "stdout" | "stderr" | "log" | "finished" | string;
  data: any;
}

export interface Output {
  onStdout?: (text: string) => void;
  onStderr?: (text: string) => void;
}

export interface RunOptions extends Output {
  language?: Language;
  stdin?: string;
  env?: Record<string, string>;
  limits?: Limits;
  isolation?: "container" | "gvisor" | "microvm";
  backend?: string;
  secrets?: string[];
  network?: { allow?: string[]; allow_private?: string[] };
  flow?: string;
  handler?: boolean;
  input?: unknown;
  variables?: Record<string, unknown>;
  output_encoding?: "utf8" | "base64";
}

export interface CreateSession {
  language?: Language;
  limits?: Limits;
  isolation?: "container" | "gvisor" | "microvm";
  backend?: string;
  workspace_mib?: number;
  workspace_files?: number;
  idle_timeout_secs?: number;
  lifetime_secs?: number;
  from_snapshot?: string;
  snapshot_after_exec?: boolean;
}

export interface ExecOptions extends Output, Omit<RunOptions, "isolation" | "backend" | keyof Output> {
  code?: string;
  argv?: string[];
}

export function parseSse(body: AsyncIterable<Uint8Array>): AsyncGenerator<Event>;

export class Airlock {
  constructor(options?: { url?: string; apiKey?: string; fetch?: typeof fetch });
  readonly url: string;
  executions: {
    get(id: string): Promise<ExecutionView>;
    list(options?: { limit?: number }): Promise<ExecutionView[]>;
    cancel(id: string): Promise<void>;
    events(id: string): AsyncGenerator<Event>;
    evidence(id: string): Promise<Evidence>;
  };
  sessions: {
    create(fields?: CreateSession): Promise<SessionHandle>;
    get(id: string): Promise<SessionHandle>;
    list(options?: { limit?: number }): Promise<SessionView[]>;
  };
  snapshots: {
    get(id: string): Promise<SnapshotView>;
    diff(id: string, against: string): Promise<SnapshotDiff>;
    tar(id: string): Promise<Uint8Array>;
  };
  run(code: string, options?: RunOptions): Promise<ExecutionView>;
}

export class SessionHandle {
  readonly id: string;
  info: SessionView;
  files: {
    write(path: string, data: string | Uint8Array, options?: { mode?: number }): Promise<FileView>;
    read(path: string): Promise<Uint8Array>;
    readText(path: string): Promise<string>;
    list(path?: string): Promise<FileView[]>;
    stat(path: string): Promise<FileView>;
    remove(path: string): Promise<void>;
  };
  exec(options: ExecOptions): Promise<ExecutionView>;
  refresh(): Promise<SessionView>;
  snapshot(): Promise<SnapshotView>;
  snapshots(): Promise<SnapshotView[]>;
  evidence(): Promise<Evidence>;
  kill(options?: { missingOk?: boolean }): Promise<void>;
}
