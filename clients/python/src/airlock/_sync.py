"""The synchronous client."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

import httpx

from ._core import (
    Event,
    Execution,
    FileInfo,
    Session,
    Snapshot,
    dispatch,
    drop_none,
    error_from,
    parse_sse,
)

Output = Optional[Callable[[str], None]]


def _segment(s: str) -> str:
    # `.` and `..` encoded too: an HTTP client would otherwise remove them
    # (RFC 3986 dot segments) and send another path than the one asked
    # for; the server refuses them, as it should.
    return s.replace(".", "%2E") if s in (".", "..") else quote(s, safe="")


def _path(p: str) -> str:
    # Each segment percent-encoded, the separators kept.
    return "/".join(_segment(s) for s in p.strip("/").split("/"))


class Airlock:
    """A client of one airlock server for one tenant's key.

    `url` and `api_key` default to `AIRLOCK_URL` and `AIRLOCK_API_KEY`.
    Use it as a context manager (or call `close()`) to release its
    connections."""

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 120.0,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        url = url or os.environ.get("AIRLOCK_URL", "http://127.0.0.1:7070")
        key = api_key or os.environ.get("AIRLOCK_API_KEY")
        if not key:
            raise ValueError("an API key is required (api_key= or AIRLOCK_API_KEY)")
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
        )
        self.executions = Executions(self)
        self.sessions = Sessions(self)
        self.snapshots = Snapshots(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Airlock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------- transport

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            raise error_from(r.status_code, r.content, r.headers.get("x-request-id"))
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        return r.json() if r.content else None

    def _events(self, path: str) -> Iterator[Event]:
        with self._http.stream("GET", path, headers={"Accept": "text/event-stream"}, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise error_from(r.status_code, r.content, r.headers.get("x-request-id"))
            yield from parse_sse(r.iter_lines())

    def _run(self, path: str, body: Dict[str, Any], on_stdout: Output, on_stderr: Output) -> Execution:
        if on_stdout is None and on_stderr is None:
            return Execution.of(self._json("POST", path, json=body))
        # Streamed: accepted at once, followed live, then the record.
        body = dict(body, wait=False)
        started = self._json("POST", path, json=body)
        for ev in self._events(f"/v1/executions/{started['id']}/events"):
            dispatch(ev, on_stdout, on_stderr)
            if ev.kind == "finished":
                break
        return self.executions.get(started["id"])

    # ---------------------------------------------------------- one-shot

    def run(
        self,
        code: str,
        language: str = "python",
        *,
        stdin: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
        isolation: Optional[str] = None,
        backend: Optional[str] = None,
        secrets: Optional[Sequence[str]] = None,
        network: Optional[Mapping[str, Any]] = None,
        on_stdout: Output = None,
        on_stderr: Output = None,
    ) -> Execution:
        """Runs code in a fresh sandbox and returns its record (with
        `on_stdout`/`on_stderr`, output is delivered as it happens)."""
        body = drop_none(
            language=language,
            code=code,
            stdin=stdin,
            env=dict(env) if env else None,
            limits=dict(limits) if limits else None,
            isolation=isolation,
            backend=backend,
            secrets=list(secrets) if secrets else None,
            network=dict(network) if network else None,
        )
        return self._run("/v1/executions", body, on_stdout, on_stderr)


class Executions:
    def __init__(self, c: Airlock):
        self._c = c

    def get(self, id: str) -> Execution:
        return Execution.of(self._c._json("GET", f"/v1/executions/{quote(id, safe='')}"))

    def list(self, limit: int = 20) -> List[Execution]:
        doc = self._c._json("GET", "/v1/executions", params={"limit": limit})
        return [Execution.of(e) for e in doc["executions"]]

    def cancel(self, id: str) -> None:
        self._c._request("POST", f"/v1/executions/{quote(id, safe='')}/cancel")

    def events(self, id: str) -> Iterator[Event]:
        """The execution's events, live while it runs (replayed after)."""
        return self._c._events(f"/v1/executions/{quote(id, safe='')}/events")

    def evidence(self, id: str) -> Dict[str, Any]:
        """Its evidence bundle (`body`, `digest`, `anchor`)."""
        return self._c._json("GET", f"/v1/executions/{quote(id, safe='')}/evidence")


class Sessions:
    def __init__(self, c: Airlock):
        self._c = c

    def create(
        self,
        language: Optional[str] = None,
        *,
        limits: Optional[Mapping[str, Any]] = None,
        isolation: Optional[str] = None,
        backend: Optional[str] = None,
        workspace_mib: Optional[int] = None,
        workspace_files: Optional[int] = None,
        idle_timeout_secs: Optional[int] = None,
        lifetime_secs: Optional[int] = None,
        from_snapshot: Optional[str] = None,
        snapshot_after_exec: Optional[bool] = None,
    ) -> "SessionHandle":
        """A new session (use it with `with` to end it on exit)."""
        body = drop_none(
            language=language,
            limits=dict(limits) if limits else None,
            isolation=isolation,
            backend=backend,
            workspace_mib=workspace_mib,
            workspace_files=workspace_files,
            idle_timeout_secs=idle_timeout_secs,
            lifetime_secs=lifetime_secs,
            from_snapshot=from_snapshot,
            snapshot_after_exec=snapshot_after_exec,
        )
        return SessionHandle(self._c, Session.of(self._c._json("POST", "/v1/sessions", json=body)))

    def get(self, id: str) -> "SessionHandle":
        return SessionHandle(self._c, Session.of(self._c._json("GET", f"/v1/sessions/{quote(id, safe='')}")))

    def list(self, limit: int = 20) -> List[Session]:
        doc = self._c._json("GET", "/v1/sessions", params={"limit": limit})
        return [Session.of(s) for s in doc["sessions"]]


class Files:
    """A session's workspace files."""

    def __init__(self, c: Airlock, sid: str):
        self._c, self._base = c, f"/v1/sessions/{quote(sid, safe='')}"

    def write(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> FileInfo:
        raw = data.encode() if isinstance(data, str) else data
        doc = self._c._json(
            "PUT",
            f"{self._base}/files/{_path(path)}",
            params={"mode": format(mode, "o")},
            content=raw,
            headers={"Content-Type": "application/octet-stream"},
        )
        return FileInfo.of(doc)

    def read(self, path: str) -> bytes:
        return self._c._request("GET", f"{self._base}/files/{_path(path)}").content

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def list(self, path: str = "") -> List[FileInfo]:
        doc = self._c._json("GET", f"{self._base}/files", params={"path": path})
        return [FileInfo.of(e) for e in doc["entries"]]

    def stat(self, path: str) -> FileInfo:
        return FileInfo.of(self._c._json("GET", f"{self._base}/stat", params={"path": path}))

    def remove(self, path: str) -> None:
        self._c._request("DELETE", f"{self._base}/files/{_path(path)}")


class SessionHandle:
    """An open session: run code and commands in it, its files, snapshots."""

    def __init__(self, c: Airlock, info: Session):
        self._c = c
        self.info = info
        self.id = info.id
        self.files = Files(c, info.id)

    def __enter__(self) -> "SessionHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill(missing_ok=True)

    def refresh(self) -> Session:
        self.info = Session.of(self._c._json("GET", f"/v1/sessions/{quote(self.id, safe='')}"))
        return self.info

    def exec(
        self,
        code: Optional[str] = None,
        *,
        argv: Optional[Sequence[str]] = None,
        language: Optional[str] = None,
        stdin: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
        secrets: Optional[Sequence[str]] = None,
        network: Optional[Mapping[str, Any]] = None,
        on_stdout: Output = None,
        on_stderr: Output = None,
    ) -> Execution:
        """Runs code (or, with `argv`, a command run as is) in a fresh
        sandbox whose /workspace is the session's."""
        body = drop_none(
            code=code,
            argv=list(argv) if argv is not None else None,
            language=language,
            stdin=stdin,
            env=dict(env) if env else None,
            limits=dict(limits) if limits else None,
            secrets=list(secrets) if secrets else None,
            network=dict(network) if network else None,
        )
        return self._c._run(f"/v1/sessions/{quote(self.id, safe='')}/exec", body, on_stdout, on_stderr)

    def executions(self, limit: int = 20) -> List[Execution]:
        doc = self._c._json("GET", f"/v1/sessions/{quote(self.id, safe='')}/executions", params={"limit": limit})
        return [Execution.of(e) for e in doc["executions"]]

    def snapshot(self) -> Snapshot:
        return Snapshot.of(self._c._json("POST", f"/v1/sessions/{quote(self.id, safe='')}/snapshots"))

    def snapshots(self) -> List[Snapshot]:
        doc = self._c._json("GET", f"/v1/sessions/{quote(self.id, safe='')}/snapshots")
        return [Snapshot.of(s) for s in doc["snapshots"]]

    def evidence(self) -> Dict[str, Any]:
        return self._c._json("GET", f"/v1/sessions/{quote(self.id, safe='')}/evidence")

    def kill(self, missing_ok: bool = False) -> None:
        """Ends the session: what runs in it is killed, its files go."""
        from ._core import ConflictError, NotFoundError

        try:
            self._c._request("DELETE", f"/v1/sessions/{quote(self.id, safe='')}")
        except (ConflictError, NotFoundError):
            if not missing_ok:
                raise


class Snapshots:
    def __init__(self, c: Airlock):
        self._c = c

    def get(self, id: str) -> Snapshot:
        return Snapshot.of(self._c._json("GET", f"/v1/snapshots/{quote(id, safe='')}"))

    def diff(self, id: str, against: str) -> Dict[str, Any]:
        return self._c._json("GET", f"/v1/snapshots/{quote(id, safe='')}/diff", params={"against": against})

    def tar(self, id: str) -> bytes:
        return self._c._request("GET", f"/v1/snapshots/{quote(id, safe='')}/tar").content
