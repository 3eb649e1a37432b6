"""Behaviour check for refactors (a development tool, not a test: pytest does not collect it).

Runs every method's smoke runs on small generated data with one smoke teacher, then fingerprints what
they wrote: every numeric metrics.json field, the sha256 of every tensor in every saved .pt file (with
its numbers), loss.csv and the pixels of every PNG. Wall-clock fields (seconds, img/s) are left out.
Run it before and after a change on the same machine and compare:

    python tests/behaviour.py before.json           # ~3 min on a free 2-core CPU
    python tests/behaviour.py after.json
    python tests/behaviour.py --diff before.json after.json

Everything runs with OMP_NUM_THREADS=1 (one thread: the same reduction order whatever else runs).
"""
import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_fashion  # noqa: E402

# (name, script and flags); each run writes into <work>/<name> (or its own chain folder under runs/).
RUNS = [
    ("sfd-nfe4", ["sfd.py", "--nfe", "4"]),
    ("sfd-nfe1", ["sfd.py", "--nfe", "1"]),                    # trains its NFE-5 first stage beside it
    ("pd-nfe4", ["pd.py", "--nfe", "4"]),
    ("pd-nfe4", ["pd.py", "--nfe", "1", "--resume"]),          # the chain continued, 4 -> 2 -> 1
    ("cd", ["cd.py", "--nfe", "4"]),
    ("cfd", ["cfd.py", "--nfe", "4"]),                         # its PD chain under runs/ (pd.py's folder)
    ("sferd-pd", ["sferd.py", "--nfe", "4"]),
    ("sferd-pd-two-stage", ["sferd.py", "--nfe", "2", "--schedule", "two-stage"]),
    ("sferd-cd", ["sferd.py", "--nfe", "4", "--base", "cd"]),
    ("sfddm", ["sfddm.py", "--nfe", "4"]),
    ("sfddm-scratch", ["sfddm.py", "--nfe", "4", "--scratch"]),
]
# Wall-clock fields, and file fingerprints (sha256 of a file whose checkpoint holds its training seconds).
TIME_KEYS = ("seconds", "img_per_s", "peak_mem", "minutes", "command", "time", "sha256")


def run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"behaviour: {' '.join(map(str, cmd))} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return r


def timeless(key):
    return not any(t in str(key).lower() for t in TIME_KEYS)


def flatten(value, name, out, work):
    """Numbers, tensors (sha256 of dtype, shape and bytes) and strings (the work folder replaced) of a nested value."""
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        raw = (t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        out[name] = f"{t.dtype} {tuple(t.shape)} {hashlib.sha256(raw).hexdigest()}"
    elif isinstance(value, dict):
        for k, v in value.items():
            if timeless(k):
                flatten(v, f"{name}.{k}", out, work)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(v, f"{name}[{i}]", out, work)
    elif isinstance(value, (bool, int, float)) or value is None:
        out[name] = value
    elif isinstance(value, str):
        out[name] = value.replace(str(work), "<work>")


def fingerprint(work):
    out = {}
    for path in sorted(Path(work).rglob("*")):
        rel = str(path.relative_to(work))
        if path.suffix == ".pt":
            flatten(torch.load(path, map_location="cpu", weights_only=True), rel, out, work)
        elif path.name == "metrics.json" or path.name == "metrics-all.json":
            def numeric(v, name):
                if isinstance(v, dict):
                    for k, x in v.items():
                        if timeless(k):
                            numeric(x, f"{name}.{k}")
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        numeric(x, f"{name}[{i}]")
                elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
                    out[name] = v
            numeric(json.loads(path.read_text()), rel)
        elif path.suffix == ".csv":
            out[rel] = list(csv.reader(path.open()))
        elif path.suffix == ".png":
            out[rel] = hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("out", nargs="?", help="write the fingerprint here (JSON)")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="compare two fingerprints")
    p.add_argument("--work", help="keep the runs in this folder (default: a temporary one)")
    args = p.parse_args()
    if args.diff:
        a, b = (json.loads(Path(f).read_text()) for f in args.diff)
        keys = sorted(set(a) | set(b))
        diff = [k for k in keys if a.get(k, "<missing>") != b.get(k, "<missing>")]
        for k in diff:
            print(f"{k}: {str(a.get(k, '<missing>'))[:100]} != {str(b.get(k, '<missing>'))[:100]}")
        print(f"{len(keys)} entries, {len(diff)} differences")
        sys.exit(1 if diff else 0)
    work = Path(args.work or tempfile.mkdtemp(prefix="fewstep-behaviour-")).resolve()
    data = make_fashion(work / "data")
    teacher = work / "teacher"
    run([ROOT / "common.py", "teacher", "--preset", "smoke", "--data-dir", data, "--out", teacher],
        work)
    for name, (script, *flags) in RUNS:
        run([ROOT / script, "--preset", "smoke", "--data-dir", data, "--teacher", teacher / "teacher.pt",
             "--out", work / "out" / name, *flags], work)
        print(f"behaviour: {script} {' '.join(flags)} done", file=sys.stderr)
    fp = fingerprint(work)
    fp = {k: v for k, v in fp.items() if not k.startswith("data/")}
    Path(args.out).write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
    print(f"behaviour: {len(fp)} entries from {len(RUNS)} runs -> {args.out} (runs in {work})")


if __name__ == "__main__":
    main()
