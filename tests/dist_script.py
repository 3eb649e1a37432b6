"""Scenarios tests/test_distributed.py runs on several processes (gloo on the CPU), each as a fewstep script runs:
through common.main_guard, under `python -m torch.distributed.run --standalone --nproc_per_node=2
tests/dist_script.py MODE [ARGS]`. Not a test file (pytest does not collect it)."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import fid  # noqa: E402


def say(line):
    """One line on stdout in one write (print writes the newline apart: two processes' lines could interleave)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def slow_images(eps):
    """A stand-in sampler: one second per batch, whichever process makes it."""
    time.sleep(1.0)
    return torch.tanh(eps)


def evaluate(design):
    """8 batches of one image: 8 s of work. old: rank 0 makes them alone while the others wait in a barrier (what
    fid.report did); split: fid.generate shares the batches, so no process waits on another."""
    pg = common.Dist("cpu")
    if design == "old":
        if pg.main:
            fid.generate(slow_images, 8, (1, 4, 4), 1, "cpu", "alone")
        pg.barrier()
    else:
        images = fid.generate(slow_images, 8, (1, 4, 4), 1, "cpu", "split", pg)
        made = fid.GENERATED["images"]
        alone = fid.generate(torch.tanh, 8, (1, 4, 4), 1, "cpu", "one process")
        assert torch.equal(common.to_uint8(images), common.to_uint8(alone))         # one process's images
        say(f"rank {pg.rank}: made {made} of 8")
    say(f"rank {pg.rank}: evaluated")
    pg.close()


def nan(out):
    """A train_loop whose loss turns NaN on rank 1 only, from its 4th update on."""
    pg = common.Dist("cpu")
    torch.manual_seed(0)
    net, step = torch.nn.Linear(4, 1), [0]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss(student, _, x, gen):
        value = (student(x) ** 2).mean()
        return value * float("nan") if pg.rank == 1 and step[0] >= 3 else value

    budget = common.Budget(total=1000, unit="updates", batch=2 * pg.world, lr=0.1, ckpt_every=10_000)
    common.train_loop(pg, loss, (4,), net, None, opt, budget, common.Run(
        Path(out) / "ck.pt", "nan-test", {}, dict(net=net), torch.Generator().manual_seed(pg.rank),
        before_step=lambda s: step.__setitem__(0, s)))
    pg.close()


def grads():
    """GradSync (small buckets, so several) on each rank's own batch: every gradient is the mean of the ranks' own
    gradients, a parameter without a gradient keeps none, a frozen one is left out."""
    common.GradSync.BUCKET_BYTES = 64
    pg = common.Dist("cpu")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3), torch.nn.Linear(3, 1))
    unused, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    params = [unused, frozen, *net.parameters()]            # backward order: the unused one's bucket comes last
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(pg.rank))
    own = torch.autograd.grad((net(x) ** 2).mean(), list(net.parameters()))
    everyone = pg.all_gather_object([g.clone() for g in own])
    sync = pg.grad_sync(params)
    (net(x) ** 2).mean().backward()
    assert sync.launched == len(sync.buckets) - 1           # launched during backward, all but the unused one's
    sync.wait()
    for p, *mine in zip(net.parameters(), *everyone):
        assert torch.equal(p.grad, sum(mine) / pg.world), (p.grad, mine)
    assert unused.grad is None and frozen.grad is None
    say(f"rank {pg.rank}: {len(sync.buckets)} buckets averaged")
    pg.close()


def fetch(url, params, cache):
    """Every rank loads the published name 'edm' from url (a local server): one downloads, the others wait."""
    common.DOWNLOAD_DIR = Path(cache)
    name = "edm-cifar10-32x32-uncond-vp.pkl"
    common.PUBLISHED["edm"] = (url, [name], name)
    common.PUBLISHED_PARAMS["edm"] = int(params)
    pg = common.Dist("cpu")
    D = common.load_denoiser("edm")
    say(f"rank {pg.rank}: loaded {common.count_params(D.net)} parameters")
    pg.close()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    common.main_guard(lambda: {"evaluate": evaluate, "nan": nan, "grads": grads, "fetch": fetch}[mode](*rest))
