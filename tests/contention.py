"""Training throughput on a shared machine (a development tool, not a test: pytest does not collect it).

Times the lab teacher's training step (the lab's heaviest loop: EDM loss, backward, Adam) quietly, then beside one
other busy process (a pure-Python loop: another student's run, a browser), and prints both and their ratio:

    python tests/contention.py                   # fewstep's OpenMP setting (common.py's top: passive waiting)
    python tests/contention.py --torch-first     # torch loaded before common: OpenMP's own default (spinning)

Run it on an otherwise idle machine; the README's "Speed on a shared machine" rows come from it.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--seconds", type=float, default=20, help="timed seconds per phase (default 20)")
p.add_argument("--torch-first", action="store_true", help="import torch before common (OpenMP's default waiting)")
args = p.parse_args()
if args.torch_first:
    import torch  # noqa: F401
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import torch  # noqa: E402,F811


def rate(seconds, step, batch):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * batch / (time.perf_counter() - t0)


torch.manual_seed(0)
net = common.UNet(in_ch=1, res=32, **common.NET_CONFIGS["lab"])
D, batch = common.Denoiser(net), common.TEACHER_PRESETS["lab"]["batch"]
opt, gen = torch.optim.Adam(net.parameters(), lr=2e-3), torch.Generator().manual_seed(0)
x = torch.rand(batch, 1, 32, 32) * 2 - 1


def step():
    loss = common.edm_loss(D, x, gen)
    opt.zero_grad()
    loss.backward()
    opt.step()


for _ in range(3):
    step()
quiet = rate(args.seconds, step, batch)
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    time.sleep(0.5)
    shared = rate(args.seconds, step, batch)
finally:
    busy.kill()
policy = "OpenMP's default" if args.torch_first else f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
print(f"{torch.get_num_threads()} threads, {policy}: quiet {quiet:.1f} img/s, beside one busy process {shared:.1f} "
      f"img/s ({100 * shared / quiet:.0f}%)")
