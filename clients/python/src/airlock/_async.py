"""The asynchronous client: the same surface as `Airlock`, awaitable."""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

import httpx

from ._core import (
    ConflictError,
    Execution,
    FileInfo,
    NotFoundError,
    Session,
    Snapshot,
    dispatch,
    drop_none,
    error_from,
    parse_sse,
)
from ._sync import Output, _path


class AsyncAirlock:
    """An asyncio client of one airlock server for one tenant's key."""

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 120.0,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ):
        url = url or os.environ.get("AIRLOCK_URL", "http://127.0.0.1:7070")
        key = api_key or os.environ.get("AIRLOCK_API_KEY")
        if not key:
            raise ValueError("an API key is required (api_key= or AIRLOCK_API_KEY)")
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
        )
        self.executions = AsyncExecutions(self)
        self.sessions = AsyncSessions(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncAirlock":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = await self._http.request(method, path, **kw)
        if r.status_code >= 400:
            raise error_from(r.status_code, r.content, r.headers.get("x-request-id"))
        return r

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = await self._request(method, path, **kw)
        return r.json() if r.content else None

    async def _run(self, path: str, body: Dict[str, Any], on_stdout: Output, on_stderr: Output) -> Execution:
        if on_stdout is None and on_stderr is None:
            return Execution.of(await self._json("POST", path, json=body))
        started = await self._json("POST", path, json=dict(body, wait=False))
        async with self._http.stream(
            "GET",
            f"/v1/executions/{started['id']}/events",
            headers={"Accept": "text/event-stream"},
            timeout=None,
        ) as r:
            if r.status_code >= 400:
                await r.aread()
                raise error_from(r.status_code, r.content, r.headers.get("x-request-id"))
            pending: List[str] = []
            async for line in r.aiter_lines():
                pending.append(line)
                if line == "":
                    finished = False
                    for ev in parse_sse(pending):
                        dispatch(ev, on_stdout, on_stderr)
                        finished = finished or ev.kind == "finished"
                    pending = []
                    if finished:
                        break
        return await self.executions.get(started["id"])

    async def run(
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
        return await self._run("/v1/executions", body, on_stdout, on_stderr)


class AsyncExecutions:
    def __init__(self, c: AsyncAirlock):
        self._c = c

    async def get(self, id: str) -> Execution:
        return Execution.of(await self._c._json("GET", f"/v1/executions/{quote(id, safe='')}"))

    async def cancel(self, id: str) -> None:
        await self._c._request("POST", f"/v1/executions/{quote(id, safe='')}/cancel")

    async def evidence(self, id: str) -> Dict[str, Any]:
        return await self._c._json("GET", f"/v1/executions/{quote(id, safe='')}/evidence")


class AsyncSessions:
    def __init__(self, c: AsyncAirlock):
        self._c = c

    async def create(self, language: Optional[str] = None, **fields: Any) -> "AsyncSessionHandle":
        body = drop_none(language=language, **fields)
        return AsyncSessionHandle(self._c, Session.of(await self._c._json("POST", "/v1/sessions", json=body)))

    async def list(self, limit: int = 20) -> List[Session]:
        doc = await self._c._json("GET", "/v1/sessions", params={"limit": limit})
        return [Session.of(s) for s in doc["sessions"]]


class AsyncFiles:
    def __init__(self, c: AsyncAirlock, sid: str):
        self._c, self._base = c, f"/v1/sessions/{quote(sid, safe='')}"

    async def write(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> FileInfo:
        raw = data.encode() if isinstance(data, str) else data
        doc = await self._c._json(
            "PUT",
            f"{self._base}/files/{_path(path)}",
            params={"mode": format(mode, "o")},
            content=raw,
            headers={"Content-Type": "application/octet-stream"},
        )
        return FileInfo.of(doc)

    async def read(self, path: str) -> bytes:
        return (await self._c._request("GET", f"{self._base}/files/{_path(path)}")).content

    async def list(self, path: str = "") -> List[FileInfo]:
        doc = await self._c._json("GET", f"{self._base}/files", params={"path": path})
        return [FileInfo.of(e) for e in doc["entries"]]

    async def stat(self, path: str) -> FileInfo:
        return FileInfo.of(await self._c._json("GET", f"{self._base}/stat", params={"path": path}))

    async def remove(self, path: str) -> None:
        await self._c._request("DELETE", f"{self._base}/files/{_path(path)}")


class AsyncSessionHandle:
    def __init__(self, c: AsyncAirlock, info: Session):
        self._c = c
        self.info = info
        self.id = info.id
        self.files = AsyncFiles(c, info.id)

    async def __aenter__(self) -> "AsyncSessionHandle":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.kill(missing_ok=True)

    async def exec(
        self,
        code: Optional[str] = None,
        *,
        argv: Optional[Sequence[str]] = None,
        on_stdout: Output = None,
        on_stderr: Output = None,
        **fields: Any,
    ) -> Execution:
        body = drop_none(code=code, argv=list(argv) if argv is not None else None, **fields)
        return await self._c._run(f"/v1/sessions/{quote(self.id, safe='')}/exec", body, on_stdout, on_stderr)

    async def snapshot(self) -> Snapshot:
        return Snapshot.of(await self._c._json("POST", f"/v1/sessions/{quote(self.id, safe='')}/snapshots"))

    async def kill(self, missing_ok: bool = False) -> None:
        try:
            await self._c._request("DELETE", f"/v1/sessions/{quote(self.id, safe='')}")
        except (ConflictError, NotFoundError):
            if not missing_ok:
                raise
