"""mri/runtime.py: scripts import TensorFlow without its C++ log lines unless asked, and name the device once."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = ("import sys; from mri import runtime; runtime.start(sys.argv[1:]); import tensorflow as tf; "
           "print(float(tf.reduce_sum(tf.ones((2, 2)))))")


def run(*args, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_tensorflow_is_quiet_and_the_device_is_named_once():
    out = run()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("device: ") and lines[1] == "4.0" and len(lines) == 2
    assert out.stderr == "", out.stderr   # no C++ log line, not even before TensorFlow's log level applies


def test_start_does_nothing_once_tensorflow_is_imported(capsys):
    import tensorflow  # noqa: F401  (imported by the test session anyway)
    from mri import runtime
    assert runtime.start([]) is None and capsys.readouterr().out == ""
