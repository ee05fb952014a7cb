"""Runs a python execution inside the sandbox: a plain script, or a handler
`def handler(ax, input)` whose JSON-serialisable return value (or exception,
with its traceback) is reported to the broker.

Kept to modules the interpreter has already loaded at start-up (sys, os):
anything else is imported only when a handler runs, so a plain script pays
next to nothing for the runner."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    with open(path, "rb") as f:
        source = f.read()
    ns = {"__name__": name, "__file__": path, "__builtins__": __builtins__}
    exec(compile(source, path, "exec"), ns)
    return ns


def _error(exc, kind=None):
    import traceback
    return {"type": kind or type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exc()}


def _handler(path):
    import json
    import airlock
    ax = airlock.connect()
    try:
        ns = _load(path, "airlock_handler")
        fn = ns.get("handler")
        if not callable(fn):
            raise NameError("the code defines no function handler(ax, input)")
    except BaseException as e:  # noqa: BLE001 - reported, not swallowed
        ax._report(error=_error(e, "HandlerMissing" if isinstance(e, NameError) else "LoadError"))
        return 1
    try:
        out = fn(ax, ax.input)
    except BaseException as e:  # noqa: BLE001
        ax._report(error=_error(e))
        return 1
    try:
        json.dumps(out, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        ax._report(error={"type": "NotSerializable", "message": str(e), "traceback": ""})
        return 1
    ax._report(output=out)
    return 0


def _pooled(path):
    # A warm sandbox: everything below is loaded before any tenant exists.
    import json  # noqa: F401
    import traceback  # noqa: F401
    import airlock
    ax = airlock.connect(_warm=True)  # blocks until an execution is bound
    with open(path, "w", encoding="utf-8") as f:
        f.write(ax._code or "")
    if ax._handler:
        return _handler(path)
    del sys.path[0]
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    _load(path, "__main__")
    return 0


def main():
    path = sys.argv[1]
    sys.argv = [path]
    mode = os.environ.get("AIRLOCK_MODE")
    if mode == "pooled":
        return _pooled(path)
    if mode == "handler":
        return _handler(path)
    del sys.path[0]
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    _load(path, "__main__")
    return 0


def _finish_fast(run):
    """Runs `run` with Python's exit semantics (SystemExit codes and
    messages, tracebacks, atexit handlers, flushed output), then leaves
    without interpreter finalisation: the sandbox is destroyed right after,
    so tearing down every module is only latency."""
    import atexit
    try:
        code = run()
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported like the interpreter does
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does at exit, in its order: wait for non-daemon
    # threads, then atexit handlers.
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:  # noqa: BLE001
            pass
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not hide the exit code
            pass
    os._exit(code & 0xFF if isinstance(code, int) else 1)


if __name__ == "__main__":
    if os.environ.get("AIRLOCK_MODE") == "pooled":
        _finish_fast(main)
    sys.exit(main())
