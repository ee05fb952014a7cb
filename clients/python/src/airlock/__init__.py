"""airlock: run untrusted code in fresh sandboxes.

    from airlock import Airlock

    with Airlock("http://127.0.0.1:7070", api_key) as client:
        print(client.run("print(6*7)").stdout)
        with client.sessions.create(language="python") as s:
            s.files.write("data.csv", "a,b\\n1,2\\n")
            r = s.exec("print(open('data.csv').read())")
            s.snapshot()

Errors the server answers are raised as `AirlockError` (and subclasses
by status and code), with the problem document's `code` and `detail`.
"""

from ._async import AsyncAirlock, AsyncSessionHandle
from ._core import (
    AirlockError,
    AuthenticationError,
    ConflictError,
    Event,
    Execution,
    FileInfo,
    InvalidRequestError,
    NotFoundError,
    PolicyDeniedError,
    RateLimitError,
    Session,
    SessionEndedError,
    Snapshot,
    WorkspaceFullError,
)
from ._sync import Airlock, SessionHandle

__all__ = [
    "Airlock",
    "AsyncAirlock",
    "SessionHandle",
    "AsyncSessionHandle",
    "AirlockError",
    "AuthenticationError",
    "ConflictError",
    "InvalidRequestError",
    "NotFoundError",
    "PolicyDeniedError",
    "RateLimitError",
    "SessionEndedError",
    "WorkspaceFullError",
    "Event",
    "Execution",
    "FileInfo",
    "Session",
    "Snapshot",
]
__version__ = "0.1.0"
