"""tools/documented_runs.py and the README's main job: every step's command parses, a step is done only when all its epochs are trained,
an interrupted run is resumed, and a failing step stops the chain without losing what was done."""
import importlib
import importlib.util
import json
import os
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    spec = importlib.util.spec_from_file_location("documented_runs", os.path.join(ROOT, "tools", "documented_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_steps_command_is_accepted_by_its_script():
    tool = load_tool()
    sys.path.insert(0, ROOT)
    for name, argv, _ in tool.STEPS:
        script = importlib.import_module(argv[0][:-len(".py")])
        script.parse_args(argv[1:])          # exits (SystemExit) on an unknown flag or a bad value
    assert len({s[0] for s in tool.STEPS}) == len(tool.STEPS), "step names must be unique"


def test_every_main_job_command_in_the_readme_is_accepted_by_its_script():
    sys.path.insert(0, ROOT)
    lines = [line.split("#")[0] for line in open(os.path.join(ROOT, "README.md")) if line.startswith("python ")
             and not line.startswith("python -m")]
    scripts = [shlex.split(line)[1] for line in lines]
    assert "data_prep.py" in scripts and "evaluate.py" in scripts and len(lines) >= 5
    for line in lines:
        argv = shlex.split(line)[1:]
        importlib.import_module(argv[0][:-len(".py")]).parse_args(argv[1:])


def write_log(out, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(out, "log.csv"), "w") as f:
        f.write("epoch,loss\n" + "".join(f"{i},0.1\n" for i in range(rows)))


def test_a_run_is_done_when_every_epoch_of_every_phase_is_logged(tmp_path, monkeypatch):
    tool = load_tool()
    monkeypatch.setattr(tool, "ROOT", str(tmp_path))
    gan, phases = 4, 2
    step = ("cgan", ["train_cgan.py", "--out", "runs/c", "--epochs", str(gan), "--encoder-epochs", str(phases)], None)
    assert tool.status(step) == "todo"
    write_log(tmp_path / "runs" / "c", gan)                # the GAN phase only: the encoder phase is still to run
    assert tool.status(step) == "resume"
    write_log(tmp_path / "runs" / "c", gan + phases)
    assert tool.status(step) == "done"
    marked = ("store", ["data_prep.py", "--out", "data/s.h5"], "data/s.h5")
    assert tool.status(marked) == "todo"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s.h5").write_text("")
    assert tool.status(marked) == "done"


def test_the_chain_resumes_runs_skips_done_steps_and_stops_at_a_failure(tmp_path, monkeypatch):
    tool = load_tool()
    monkeypatch.setattr(tool, "ROOT", str(tmp_path))
    # a fake trainer: records its arguments, logs one epoch per call
    (tmp_path / "train_x.py").write_text(
        "import sys, os\nout = sys.argv[sys.argv.index('--out') + 1]\nos.makedirs(out, exist_ok=True)\n"
        "open(os.path.join(out, 'calls.txt'), 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "open(os.path.join(out, 'config.json'), 'w').write('{}')\n"
        "log = os.path.join(out, 'log.csv')\nnew = not os.path.exists(log)\n"
        "open(log, 'a').write(('epoch\\n' if new else '') + '0\\n')\n")
    (tmp_path / "fail.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "touch.py").write_text("import sys; open(sys.argv[1], 'w').write('x')\n")
    steps = [("first", ["touch.py", "first.txt"], "first.txt"),
             ("train", ["train_x.py", "--out", "runs/x", "--epochs", "1"], None),
             ("broken", ["fail.py"], "never.txt"),
             ("after", ["touch.py", "after.txt"], "after.txt")]
    monkeypatch.setattr(tool, "STEPS", steps)
    write_log(tmp_path / "runs" / "x", 0)                   # an interrupted run: config, no epoch logged
    with pytest.raises(SystemExit, match="broken failed"):
        tool.main([])
    assert (tmp_path / "first.txt").exists() and not (tmp_path / "after.txt").exists()
    assert (tmp_path / "runs" / "x" / "calls.txt").read_text().split()[-1] == "--resume"
    times = json.loads((tmp_path / "logs" / "documented" / "times.json").read_text())
    assert [t["rc"] for t in times["broken"]] == [3] and times["train"][0]["resumed"]
    (tmp_path / "first.txt").write_text("kept")
    with pytest.raises(SystemExit):
        tool.main([])                                       # done steps are not run again
    assert (tmp_path / "first.txt").read_text() == "kept"
    assert len((tmp_path / "runs" / "x" / "calls.txt").read_text().splitlines()) == 1
    tool.main(["--only", "after"])
    assert (tmp_path / "after.txt").exists()
    with pytest.raises(SystemExit, match="unknown steps"):
        tool.main(["--only", "nope"])
