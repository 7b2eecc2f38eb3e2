"""Run the documented results' commands (docs/results.md) in order, resuming where an earlier call stopped.

    python tools/documented_runs.py --list                 # the steps and whether each is done
    python tools/documented_runs.py                        # run every step not done yet
    python tools/documented_runs.py --only fader,evaluate  # just these steps (names as --list prints them)

A step is done when its output exists: the store (data_prep.py), oracle.keras (train_oracle.py), a checkpoint
trained for all its epochs (train_*.py; an interrupted run is continued with --resume, exactly), dfi.npz or
metrics.json. Each step's output goes to logs/documented/<step>.log and its wall time to
logs/documented/times.json. A failing step stops the chain (what it needs would be missing); its log names
the cause. The steps' commands are the ones docs/results.md prints, from STEPS below.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE, ORACLE_STORE = "data/synthetic.h5", "data/synthetic_oracle.h5"
VISITS = "bl,m36,m72"     # visits 3 and 6 years apart: a 1-2-year change is small against scan noise (docs/longitudinal.md)
ORACLE, REGRESSOR = "runs/oracle_independent", "runs/regressor"
TRAIN = ["--store", STORE, "--attrs", "age,dx"]

# (name, argv, the file whose existence marks the step done; None: a train_*.py run, done when trained)
STEPS = [
    ("store", ["data_prep.py", "--synthetic", "200", "--synthetic-visits", VISITS, "--out", STORE], STORE),
    ("oracle_store", ["data_prep.py", "--synthetic", "1000", "--seed", "1", "--out", ORACLE_STORE], ORACLE_STORE),
    ("regressor", ["train_oracle.py", *TRAIN, "--out", REGRESSOR, "--epochs", "4", "--patience", "2", "--seed", "1"],
     REGRESSOR + "/oracle.keras"),
    ("fader", ["train_fader.py", *TRAIN, "--out", "runs/fader/synthetic", "--n-layers", "4", "--epochs", "20",
               "--steps-per-epoch", "200", "--lambda-lat", "1e-2", "--lambda-clf", "1e-3",
               "--lambda-ramp-steps", "500"], None),
    ("oracle", ["train_oracle.py", "--store", ORACLE_STORE, "--attrs", "age,dx", "--out", ORACLE,
                "--epochs", "6", "--patience", "2"], ORACLE + "/oracle.keras"),
    ("longitudinal", ["train_longitudinal.py", *TRAIN, "--out", "runs/longitudinal/synthetic",
                      "--parameterisation", "intensity", "--filters", "16", "--batch-size", "16",
                      "--epochs", "4", "--steps-per-epoch", "250"], None),
    ("cgan", ["train_cgan.py", *TRAIN, "--out", "runs/cgan/synthetic", "--filters", "16", "--epochs", "4",
              "--steps-per-epoch", "100", "--encoder-epochs", "2"], None),
    ("cgan_laplacian", ["train_cgan.py", *TRAIN, "--out", "runs/cgan/synthetic_laplacian", "--laplacian",
                        "--filters", "16", "--epochs", "4", "--steps-per-epoch", "100", "--encoder-epochs", "2"],
     None),
    ("evaluate", ["evaluate.py", "--store", STORE, "--oracle", ORACLE, "--out", "reports/synthetic", "--n", "256",
                  "--methods", "identity,meandiff,truth,runs/fader/synthetic,runs/fader/synthetic@residual,"
                  "runs/cgan/synthetic,runs/cgan/synthetic_laplacian,runs/longitudinal/synthetic"],
     "reports/synthetic/metrics.json"),
    ("cyclegan_dx", ["train_cyclegan.py", "--store", STORE, "--domains", "dx=CN:Dementia", "--out", "runs/cyclegan/dx",
                     "--filters", "16", "--batch-size", "4", "--epochs", "10", "--steps-per-epoch", "100"], None),
    ("cyclegan_age", ["train_cyclegan.py", "--store", STORE, "--domains", "age<70:age>=75",
                      "--out", "runs/cyclegan/age", "--filters", "16", "--batch-size", "4", "--epochs", "10",
                      "--steps-per-epoch", "100"], None),
    ("evaluate_cyclegan", ["evaluate.py", "--store", STORE, "--oracle", ORACLE, "--out", "reports/synthetic_cyclegan",
                           "--n", "256", "--methods", "identity,meandiff,truth,runs/fader/synthetic@residual,"
                           "runs/cyclegan/dx,runs/cyclegan/age"], "reports/synthetic_cyclegan/metrics.json"),
    ("infogan", ["train_infogan.py", *TRAIN, "--out", "runs/infogan/synthetic", "--filters", "16", "--hidden", "256",
                 "--batch-size", "32", "--epochs", "30", "--steps-per-epoch", "100", "--encoder-epochs", "5"], None),
    ("evaluate_infogan", ["evaluate.py", "--store", STORE, "--oracle", ORACLE, "--out", "reports/synthetic_infogan",
                          "--n", "256", "--methods", "identity,meandiff,truth,runs/infogan/synthetic,"
                          "runs/infogan/synthetic@residual"], "reports/synthetic_infogan/metrics.json"),
    ("dfi", ["train_dfi.py", *TRAIN, "--features", REGRESSOR, "--out", "runs/dfi/synthetic_k400", "--k", "400",
             "--window", "0", "--alpha", "4", "--tv-weight", "1", "--mode", "residual"], "runs/dfi/synthetic_k400/features.h5"),
    ("evaluate_dfi", ["evaluate.py", "--store", STORE, "--oracle", ORACLE, "--out", "reports/synthetic_dfi", "--n", "64",
                      "--methods", "identity,meandiff,truth,runs/fader/synthetic@residual,runs/dfi/synthetic_k400,"
                      "runs/dfi/synthetic_k400@decode"], "reports/synthetic_dfi/metrics.json"),
    ("vagan", ["train_vagan.py", *TRAIN, "--regressor", REGRESSOR, "--out", "runs/vagan/synthetic", "--filters", "8",
               "--batch-size", "16", "--n-critic-long", "20", "--critic-warmup", "5", "--pair-weight", "100",
               "--epochs", "4", "--steps-per-epoch", "100"], None),
    ("evaluate_vagan", ["evaluate.py", "--store", STORE, "--oracle", ORACLE, "--out", "reports/synthetic_vagan",
                        "--n", "256", "--methods", "identity,meandiff,truth,runs/fader/synthetic@residual,"
                        "runs/vagan/synthetic"], "reports/synthetic_vagan/metrics.json"),
    ("followup", ["evaluate.py", "--followup", "--store", STORE, "--out", "reports/synthetic_followup", "--n", "256",
                  "--methods", "identity,meandiff,truth,runs/fader/synthetic,runs/fader/synthetic@residual,"
                  "runs/cgan/synthetic,runs/cgan/synthetic_laplacian,runs/longitudinal/synthetic,runs/cyclegan/dx,"
                  "runs/cyclegan/age,runs/infogan/synthetic@residual,runs/vagan/synthetic,runs/dfi/synthetic_k400"],
     "reports/synthetic_followup/metrics.json"),
]


def trained(out, argv):
    """A train_*.py run in `out` has a checkpoint and log.csv rows for every epoch it was asked for."""
    log = os.path.join(out, "log.csv")
    if not os.path.exists(log):
        return False
    epochs = int(argv[argv.index("--epochs") + 1]) if "--epochs" in argv else None
    for extra in ("--encoder-epochs",):
        if extra in argv:
            epochs += int(argv[argv.index(extra) + 1])
    with open(log) as f:
        rows = sum(1 for line in f if line.strip()) - 1
    return epochs is not None and rows >= epochs


def status(step):
    name, argv, marker = step
    if marker is not None:
        return "done" if os.path.exists(os.path.join(ROOT, marker)) else "todo"
    out = os.path.join(ROOT, argv[argv.index("--out") + 1])
    if trained(out, argv):
        return "done"
    return "resume" if os.path.exists(os.path.join(out, "config.json")) else "todo"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print each step, its command and state; run nothing")
    p.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    args = p.parse_args(argv)
    names = [s[0] for s in STEPS]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"--only: unknown steps {unknown}; the steps are {names}")
    logs = os.path.join(ROOT, "logs", "documented")
    os.makedirs(logs, exist_ok=True)
    times_path = os.path.join(logs, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for step in STEPS:
        name, cmd, _ = step
        state = status(step)
        if args.list:
            print(f"{name:18s} {state:7s} python {' '.join(cmd)}")
            continue
        if (only and name not in only) or state == "done":
            continue
        full = [sys.executable, *cmd] + (["--resume"] if state == "resume" else [])
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(full[1:])}", flush=True)
        start = time.time()
        with open(os.path.join(logs, f"{name}.log"), "a") as log:
            rc = subprocess.call(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.time() - start
        times.setdefault(name, []).append({"seconds": round(seconds, 1), "rc": rc, "resumed": state == "resume",
                                           "ended": time.strftime("%Y-%m-%d %H:%M:%S")})
        tmp = times_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(times, f, indent=1)
        os.replace(tmp, times_path)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {rc} after {seconds:.0f} s", flush=True)
        if rc != 0:
            raise SystemExit(f"{name} failed (rc {rc}); see {os.path.join(logs, name + '.log')}")


if __name__ == "__main__":
    main()
