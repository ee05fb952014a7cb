"""Runs a python execution inside the sandbox: a plain script, or a handler
`def handler(ax, input)` whose JSON-serialisable return value (or exception,
with its traceback) is reported to the broker."""
import json
import os
import runpy
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import airlock  # noqa: E402


def _error(exc, kind=None):
    return {"type": kind or type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exc()}


def main():
    path = sys.argv[1]
    sys.argv = [path]
    if os.environ.get("AIRLOCK_MODE") != "handler":
        runpy.run_path(path, run_name="__main__")
        return 0
    ax = airlock.connect()
    try:
        ns = runpy.run_path(path, run_name="airlock_handler")
        fn = ns.get("handler")
        if not callable(fn):
            raise NameError("the code defines no function handler(ax, input)")
    except BaseException as e:  # noqa: BLE001 - reported, not swallowed
        ax._report(error=_error(e, "LoadError" if not isinstance(e, NameError) else "HandlerMissing"))
        return 1
    try:
        out = fn(ax, ax.input)
    except BaseException as e:  # noqa: BLE001
        ax._report(error=_error(e))
        return 1
    try:
        json.dumps(out)
    except (TypeError, ValueError) as e:
        ax._report(error={"type": "NotSerializable", "message": str(e), "traceback": ""})
        return 1
    ax._report(output=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
