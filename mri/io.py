"""Small helpers shared by every script: atomic writes, JSON, clean error exits."""
import contextlib
import glob
import json
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path):
    """Remove the `<path>.tmp-<pid>` files that atomic_path left behind in processes that no longer run (a
    run killed with -9); those of the current process and of any live process are kept. Returns the removed paths."""
    removed = []
    for tmp in sorted(glob.glob(glob.escape(os.fspath(path)) + ".tmp-*")):
        pid = tmp.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or not os.path.isfile(tmp):
            continue
        try:
            os.remove(tmp)
        except FileNotFoundError:  # another run removed it first
            continue
        removed.append(tmp)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no valid pid: keep its file
        pass
    return True


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
            f.write("\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


@contextlib.contextmanager
def exit_on(*errors):
    """Turn `errors` raised in the block into an exit with `error: <message>` (a KeyError's without quotes)."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
