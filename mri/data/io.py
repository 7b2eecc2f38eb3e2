"""Small helpers shared by every script: atomic writes, JSON, clean error exits, the hash of a run's weights."""
import contextlib
import glob
import hashlib
import io
import json
import os
import zipfile

import numpy as np

# a run directory's weight files: a Keras model (train_oracle.py's oracle.keras), a Keras weights file, a
# training checkpoint (mri/training.py)
WEIGHT_FILES = ("*.keras", "*.weights.h5", "checkpoint.npz")


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


# --- the content hash of a run's weights -------------------------------------------------------------------
def weights_hash(run_dir):
    """SHA-256 of the weights in a run directory: the digest of every array of its WEIGHT_FILES (dtype, shape
    and bytes), the digests sorted. It names the weights, not the files: a copy, a re-save (a .keras zip
    records its save time, its weights do not change) or renamed layers hash alike, and any changed weight
    changes it."""
    files = sorted(f for p in WEIGHT_FILES for f in glob.glob(os.path.join(glob.escape(os.fspath(run_dir)), p))
                   if ".tmp-" not in os.path.basename(f))
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no weights ({', '.join(WEIGHT_FILES)}): give a trained run directory")
    digests = sorted(_digest(a) for f in files for a in _weight_arrays(f))
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _digest(array):
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def _weight_arrays(path):
    """The arrays of one weight file: the datasets of a Keras weights file (inside a .keras zip too), or
    the arrays of an .npz checkpoint."""
    if path.endswith(".npz"):
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files)]
    import h5py
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as z:
            source = io.BytesIO(z.read("model.weights.h5"))
    else:
        source = path
    out = []
    with h5py.File(source, "r") as f:
        f.visititems(lambda name, obj: out.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out
