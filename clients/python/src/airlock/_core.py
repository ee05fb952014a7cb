"""What the sync and async clients share: errors from problem documents,
the typed records, request bodies and the Server-Sent Events parser."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional

__all__ = [
    "AirlockError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "SessionEndedError",
    "RateLimitError",
    "InvalidRequestError",
    "PolicyDeniedError",
    "WorkspaceFullError",
    "Execution",
    "Session",
    "FileInfo",
    "Snapshot",
    "Event",
]


class AirlockError(Exception):
    """An error the server answered: its HTTP status, its stable `code`
    (`urn:airlock:problem:<code>`), the detail and the request id that
    names it in the server's log."""

    def __init__(self, status: int, code: str, detail: str, request_id: Optional[str] = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id


class AuthenticationError(AirlockError):
    """401: the key is missing, unknown, revoked or expired."""


class NotFoundError(AirlockError):
    """404: nothing of this tenant's by that id (or no such file)."""


class ConflictError(AirlockError):
    """409: the state forbids it (already finished, wrong file type...)."""


class SessionEndedError(ConflictError):
    """409 `session_ended`: the session ended; start another one."""


class RateLimitError(AirlockError):
    """429: too many requests, queued executions or sessions."""


class InvalidRequestError(AirlockError):
    """400: the request is malformed or names something invalid."""


class PolicyDeniedError(AirlockError):
    """422: denied by policy, isolation or quota."""


class WorkspaceFullError(AirlockError):
    """507: the workspace's quota is used up; nothing changed."""


_BY_CODE = {
    "session_ended": SessionEndedError,
    "workspace_full": WorkspaceFullError,
}
_BY_STATUS = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    422: PolicyDeniedError,
    429: RateLimitError,
}


def error_from(status: int, body: bytes, request_id: Optional[str]) -> AirlockError:
    """The exception for an error response (problem+json, or anything)."""
    try:
        doc = json.loads(body)
        code, detail = str(doc.get("code", "error")), str(doc.get("detail", ""))
    except (ValueError, AttributeError):
        code, detail = "error", body[:200].decode("utf-8", "replace")
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or AirlockError
    return cls(status, code, detail, request_id)


@dataclass
class Execution:
    """One execution's record: status, reason, exit code, output, usage and
    the isolation layers enforced (`result`)."""

    id: str
    status: str
    language: str
    reason: Optional[str]
    error: Optional[str]
    result: Optional[Dict[str, Any]]
    output: Any
    handler_error: Optional[Dict[str, Any]]
    session_id: Optional[str]
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> "Execution":
        return cls(
            id=d["id"],
            status=d["status"],
            language=d["language"],
            reason=d.get("reason"),
            error=d.get("error"),
            result=d.get("result"),
            output=d.get("output"),
            handler_error=d.get("handler_error"),
            session_id=d.get("session_id"),
            raw=dict(d),
        )

    @property
    def exit_code(self) -> Optional[int]:
        return (self.result or {}).get("exit_code")

    @property
    def stdout(self) -> str:
        return (self.result or {}).get("stdout", "")

    @property
    def stderr(self) -> str:
        return (self.result or {}).get("stderr", "")

    @property
    def done(self) -> bool:
        return self.status in ("finished", "failed")


@dataclass
class Session:
    """A session's record."""

    id: str
    status: str
    language: str
    backend: str
    end_reason: Optional[str]
    workspace: Dict[str, Any]
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> "Session":
        return cls(
            id=d["id"],
            status=d["status"],
            language=d["language"],
            backend=d["backend"],
            end_reason=d.get("end_reason"),
            workspace=d.get("workspace", {}),
            raw=dict(d),
        )


@dataclass
class FileInfo:
    """A file, directory or symlink of a workspace."""

    name: str
    type: str
    size: int
    mode: int
    modified_at: str

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> "FileInfo":
        return cls(d["name"], d["type"], d["size"], d["mode"], d["modified_at"])


@dataclass
class Snapshot:
    """A snapshot of a workspace (its manifest when fetched by id)."""

    id: str
    session_id: str
    reason: str
    digest: str
    entries: int
    bytes: int
    execution_id: Optional[str]
    manifest: Optional[List[Dict[str, Any]]]
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> "Snapshot":
        return cls(
            id=d["id"],
            session_id=d["session_id"],
            reason=d["reason"],
            digest=d["digest"],
            entries=d["entries"],
            bytes=d["bytes"],
            execution_id=d.get("execution_id"),
            manifest=d.get("manifest"),
            raw=dict(d),
        )


@dataclass
class Event:
    """One Server-Sent Event of an execution: `started`, `stdout`,
    `stderr`, `log` or `finished`, with its JSON data."""

    kind: str
    data: Any


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from the lines of a text/event-stream (comments skipped)."""
    kind, data = "message", []
    for line in lines:
        line = line.rstrip("\r")
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield Event(kind, value)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)


def dispatch(ev: Event, on_stdout: Optional[Callable[[str], None]], on_stderr: Optional[Callable[[str], None]]) -> None:
    if ev.kind == "stdout" and on_stdout is not None:
        on_stdout(ev.data.get("data", ""))
    elif ev.kind == "stderr" and on_stderr is not None:
        on_stderr(ev.data.get("data", ""))


def drop_none(**fields: Any) -> Dict[str, Any]:
    """A request body of the fields given (None: left to the server)."""
    return {k: v for k, v in fields.items() if v is not None}


def execution_body(language: Optional[str], code: Optional[str], **kw: Any) -> Dict[str, Any]:
    return drop_none(language=language, code=code, **kw)
