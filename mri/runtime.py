"""The TensorFlow runtime of every script: TensorFlow's C++ log lines kept quiet unless asked for, and one line
naming the device.

Without a GPU, importing TensorFlow prints lines such as `failed call to cuInit: INTERNAL: CUDA error` at error
level, some of them before TensorFlow's own log level applies (`TF_CPP_MIN_LOG_LEVEL` does not reach them), and
a newcomer reads them as a failure. `start` imports TensorFlow with its C++ stderr sent to /dev/null and its log
level at 3, then prints `device: CPU (no GPU found)` or the GPUs. With `--verbose` among the script's
arguments, or `TF_CPP_MIN_LOG_LEVEL` set in the environment, TensorFlow logs as it would by itself."""
import contextlib
import os
import sys

VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = "show TensorFlow's own C++ log lines (also: set TF_CPP_MIN_LOG_LEVEL in the environment)"


@contextlib.contextmanager
def stderr_to_devnull():
    """File descriptor 2 (C++ code's stderr too) sent to /dev/null inside the block."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def start(argv=None):
    """Import TensorFlow (quietly unless asked otherwise) and print the device line; a no-op when TensorFlow is
    already imported. Returns the device line, or None."""
    if "tensorflow" in sys.modules:
        return None
    argv = sys.argv[1:] if argv is None else argv
    verbose = VERBOSE_FLAG in argv or "TF_CPP_MIN_LOG_LEVEL" in os.environ
    if not verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with contextlib.nullcontext() if verbose else stderr_to_devnull():
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
    line = "device: " + (", ".join(g.name for g in gpus) if gpus else "CPU (no GPU found)")
    print(line, flush=True)
    return line
