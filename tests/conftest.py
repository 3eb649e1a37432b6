"""Shared test fixtures: small generated datasets in the real on-disk formats (never a download,
never the cached lab teacher), a way to run a fewstep script as a user would, and the analytic
Gaussian denoiser and the ancestral DDPM sampler the math tests check samplers and targets against."""
import gzip
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_idx(path, array):
    """An MNIST-format idx file, gzip-compressed: magic 2048 + ndim, big-endian dims, uint8 data."""
    header = (2048 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion(folder, n_train=64, n_test=16, seed=0):
    """Tiny Fashion-MNIST look-alike: bright blobs on black, 28x28, ten labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        yy, xx = np.mgrid[:28, :28]
        cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
        r = rng.uniform(4, 9, (n, 1, 1))
        images = (255 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    return folder


def gaussian_denoiser(mu=0.0, var=1.0, calls=None):
    """The exact D(x, sigma) = E[x0 | x0 + sigma*n] of Gaussian data x0 ~ N(mu, var) per pixel:
    mu + var/(var + sigma^2) (x - mu). sigma: a number, or a tensor (one level, or one per sample);
    calls: a list that records the sigma of every call."""
    def D(x, sigma, cond=None):
        if calls is not None:
            calls.append(float(sigma))
        if torch.is_tensor(sigma):                   # in x's dtype, one level per sample broadcast over the rest
            sigma = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma.to(x.dtype)
        return mu + var / (var + sigma**2) * (x - mu)
    return D


def sample_ddpm(D, x, sigmas, callback=None, noise=torch.randn_like):
    """Ancestral DDPM (Ho et al. 2020, Eq. 6-7), the reference sfddm.py's Alg. 2 is checked against, on the sigmas
    of a VP table, in the x = z/alpha view: x <- x0 + sigma_down*eps_hat + sigma_up*noise, sigma_up^2 = s'^2 (s^2 - s'^2)/s^2,
    sigma_down^2 = s'^2 - sigma_up^2 (the DDPM posterior, rescaled by 1/alpha_{t-1})."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, t_cur)
        if t_next == 0:
            x = x0
        else:
            sigma_up = t_next * math.sqrt(1 - t_next**2 / t_cur**2)
            sigma_down = math.sqrt(t_next**2 - sigma_up**2)
            x = x0 + sigma_down * (x - x0) / t_cur + sigma_up * noise(x)
        if callback:
            callback(i, x)
    return x


def pytest_configure(config):
    config.addinivalue_line("markers", "fid: the test computes an FID (may load the Inception weights)")


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    return make_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path, request):
    """Tests never touch the network or the user's cache."""
    import common

    def refuse(url, path, md5, check=None):
        raise common.UserError(f"test tried to download {url}")

    monkeypatch.setattr(common, "download", refuse)
    monkeypatch.setattr(common, "DOWNLOAD_DIR", tmp_path / "cache")
    monkeypatch.setattr(common, "FASHION_DEBIAN", tmp_path / "no-debian-package")
    if not request.node.get_closest_marker("fid"):       # smoke runs (FID off) must not need Inception weights
        import fid

        def no_inception(path=None):
            raise common.UserError("test needed the Inception weights without asking for an FID")

        monkeypatch.setattr(fid, "find_weights", no_inception)


def run_script(*args, cwd, timeout=600, torchrun=0):
    """Run a fewstep script in a subprocess from cwd (its runs/ lands there); returns the result."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    else:
        cmd = [sys.executable]
    return subprocess.run(cmd + [str(ROOT / args[0]), *map(str, args[1:])], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_teacher(fashion_dir, tmp_path_factory):
    """A smoke-preset teacher trained on the generated data (a few seconds); its path."""
    import common
    return common.train_teacher("fashion", "smoke", tmp_path_factory.mktemp("teacher"), fashion_dir, images=64)


def check_run_pictures(folder, stages, trajectory=True):
    """A finished run's pictures and loss curve: loss.png (and trajectory.png, the student beside the teacher) are
    whole PNG files; loss.csv has a stage column naming the stages in order, images growing, finite losses.
    Returns loss.csv's rows (header first)."""
    import csv
    import math
    from PIL import Image
    for name in ("loss.png", "trajectory.png") if trajectory else ("loss.png",):
        with Image.open(Path(folder) / name) as im:
            assert im.format == "PNG" and min(im.size) > 100, name
            im.verify()
    rows = list(csv.reader(open(Path(folder) / "loss.csv")))
    assert rows[0][:3] == ["stage", "images", "loss"], rows[0]
    assert list(dict.fromkeys(r[0] for r in rows[1:])) == list(stages), rows
    images = [int(r[1]) for r in rows[1:]]
    assert images == sorted(set(images)) and all(math.isfinite(float(r[2])) for r in rows[1:]), rows
    return rows


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """A smoke-sized fashion teacher.pt with random (non-zero) weights and dropout 0.1, written without training: for
    the tests of what a script's main builds (MainSpy), which never train it."""
    import common
    torch.manual_seed(0)
    net = common.UNet(in_ch=1, res=32, **dict(common.NET_CONFIGS["smoke"], dropout=0.1))   # dropout as the paper net's
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("random-teacher") / "teacher.pt"
    common.save_checkpoint(path, "teacher", net_config=net.config, ema=net.state_dict(), dataset="fashion")
    return path


class MainSpy:
    """Runs a script's main with common.train_loop and fid.report replaced, to inspect what main builds (not a re-run
    of the same code): each loop is recorded (its arguments, its Run's fields and the train/eval mode of its nets and
    of the student), then 'trains' by adding a different random perturbation to every net it was given (so an online
    network and its EMA differ afterwards); each report records its arguments, the sampler, and the modes of every net
    seen so far. probe(record), if set, is called inside each loop (a stage's loss may bind the stage's variables late)."""

    def __init__(self, monkeypatch):
        import common
        import fid
        self.loops, self.reports, self._nets, self.probe = [], [], [], None
        monkeypatch.setattr(common, "train_loop", self._loop)
        monkeypatch.setattr(fid, "report", self._report)

    def _loop(self, pg, loss, data, student, teacher, opt, budget, run):
        nets = run.nets
        self.loops.append(dict(vars(run), loss=loss, data=data, student=student, teacher=teacher, opt=opt, budget=budget,
                               training={k: m.training for k, m in nets.items()},
                               states={k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in nets.items()},
                               student_training=getattr(student, "training", None)))
        self._nets += list(nets.values())
        if self.probe:                               # a test's look at this loop while it runs (its loss binds late)
            self.probe(self.loops[-1])
        g = torch.Generator().manual_seed(len(self.loops))
        with torch.no_grad():
            for module in nets.values():
                for p in module.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device))
        run.path.parent.mkdir(parents=True, exist_ok=True)
        run.path.touch()                             # the checkpoint's place (a caller may remove it), empty
        steps = -(-budget.total // (1 if budget.unit == "updates" else budget.batch))
        return dict(step=steps, done=budget.total, images=steps * budget.batch, seconds=1.0, loss_start=1.0,
                    loss_avg=0.5, curve=[[budget.batch, 1.0, 0.5, 0.5]], acc={}, finished=True)

    def _report(self, args, pg, out, teacher, teacher_path, sample_fn, info, shape, student=None, curves=None):
        self.reports.append(dict(args=args, out=out, teacher=teacher, sample_fn=sample_fn, info=info, shape=shape,
                                 training={id(m): m.training for m in self._nets}, student=student, curves=curves))
        return dict(info, fid=None, fid_n=0, teacher_rms=0.0, images_seen=info.get("images_seen"))
