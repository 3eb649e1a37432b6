"""fewstep common substrate: what every distillation method needs, written to be read.

Part A, what a method reader meets, in reading order (after the conventions below, the constants):
  1. The EDM denoiser D(x, sigma) and the VP adapters (x0 / eps / v in VP notation)
  2. Noise schedules: Karras grid, cosine log-SNR, discrete DDPM tables
  3. Samplers with one signature (denoiser, x, sigmas, callback): Euler/DDIM, Heun,
     DPM-Solver++(2M/3M) (no method's flags: AFS and thresholding live in sfd.py)
  4. The compact U-Net (DDPM/ADM style), with attention maps, hidden features,
     split encoder/decoder and a zero-initialised extra conditioning input
  5. EMA
  6. The training loop every method and the teacher run through (train_loop, its Budget and Run), resume_from
  7. The shared teacher (EDM training), and a student initialised from it (student_from)
Part B, machinery a method reader may skip:
  8. Errors and the command-line convention shared by all scripts (with where --export writes)
  9. Data: Fashion-MNIST, CIFAR-10, any image folder
  10. Plumbing: seeds with per-sample noise, checkpoints, run folders and locks, image grids, DDP, autocast
  11. The training loop's machinery: reading the losses (settle), stop signals, a run's checkpoint
  12. Loading the teacher a method distils
  13. Published teachers (--teacher edm | ddpm | PATH): EDM's SongUNet, DDPM's U-Net in diffusers'
     layout, an EDM snapshot reader that runs no code, load_denoiser for every teacher spec
  14. The bench of every method's training step (python common.py bench), its FLOPs (flops), the CPU refusal
  15. The command line
Part A as each method file uses it (common.<name> in its code; constants left out):
  pd.py     Denoiser, freeze, vp_predict, cosine_alpha_sigma, Budget, Run, train_loop, optimizer_steps, resume_from,
            resume_note, student_from
  cd.py     as_batch, edm_precond, karras_sigmas, build_net, Budget, Run, train_loop, optimizer_steps, resume_from,
            student_from
  cfd.py    vp_predict, Budget, Run, train_loop, optimizer_steps, resume_note
  sferd.py  as_batch, edm_precond, vp_from_sigma, sigma_from_vp, vp_predict, karras_sigmas, append_zero,
            cosine_alpha_sigma, ddpm_alpha_bar, timestep_embedding, group_norm, zero_init, build_net, constant_lr,
            Budget, Run, train_loop, optimizer_steps, resume_from, resume_note
  sfddm.py  Denoiser, vp_predict, append_zero, ddpm_alpha_bar, sigma_from_alpha_bar, sample_dpmpp, build_net,
            count_params, ema_beta, warmup_lr, Budget, Run, train_loop, optimizer_steps, resume_from, student_from
  sfd.py    Denoiser, freeze, karras_sigmas, sample_euler, sample_heun, sample_dpmpp, timestep_embedding,
            count_params, Budget, Run, train_loop, optimizer_steps, resume_from, student_from
The evaluation every method reports (metrics.json, the teacher's rows, --export) is fid.py's: common <- fid <- methods.

Conventions: images are N x C x H x W in [-1, 1]; every
network is used as a denoiser D(x, sigma) in the variance-exploding view x = x0 + sigma*eps
(Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS
2022, arXiv:2206.00364, "EDM" below). A VP process z_t = alpha_t*x0 + s_t*eps is the same process
rescaled: x = z_t/alpha_t, sigma = s_t/alpha_t.

Command line:
  python common.py teacher --dataset fashion --preset lab      # train and cache the shared teacher
  torchrun --nproc_per_node=2 common.py teacher --preset smoke  # the same on two processes
  python common.py bench [--preset paper|smoke]                # time every method's training step here
  python common.py flops                                       # count their FLOPs (no GPU) and project GPU hours
"""
import argparse
import atexit
import codecs
import collections
import dataclasses
import datetime
import errno
import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP's threads wait for work by spinning: beside one other busy process on a 2-core laptop (a second run, a
# browser) a training step then ran at about a third of its quiet speed; waiting passively keeps well over half, at
# about a tenth less when the machine is quiet (README, "Speed on a shared machine"; OMP_WAIT_POLICY=ACTIVE for a
# quiet one). OpenMP reads this once, when torch loads it: so common is imported before torch everywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

try:
    import fcntl                        # POSIX (Linux, macOS): run folders and downloads are locked; elsewhere not
except ImportError:
    fcntl = None

RUNS = Path("runs")            # every output lands under runs/<dataset>/ (git-ignored)
SIGMA_DATA = 0.5               # EDM's sigma_data: the std of the (scaled) images
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0   # EDM's time grid (Eq. 5): every method's noise levels lie in it
CKPT_FORMAT = 1                # bumped when a saved model's layout changes (check_settings refuses older training layouts)
EVAL_SEED = 1_000_000          # the noise every evaluation uses, so runs compare sample by sample


# ----------------------------------------------------------------------------------------------
# 1. The denoiser D(x, sigma) with EDM preconditioning, and the VP adapters
# ----------------------------------------------------------------------------------------------

def as_batch(value, x):
    """A scalar, 0-d or length-B tensor as a B x 1 x 1 x 1 float32 tensor on x's device. A Python number is
    filled in on the device (x.new_full): torch.as_tensor would copy it from the host, a blocking copy on every
    network call of a sampler."""
    if torch.is_tensor(value):
        value = value.to(x.device, torch.float32)
    else:
        value = x.new_full((1, 1, 1, 1), value, dtype=torch.float32)
    return value.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def edm_precond(sigma, sigma_data=SIGMA_DATA):
    """EDM Table 1: c_skip, c_out, c_in, c_noise (sigma is B x 1 x 1 x 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip*x + c_out*F(c_in*x, c_noise)  (EDM Eq. 7), sigma_data from the net's config
    (EDM snapshots store theirs); for DDPM's eps network (section 13) D(x, sigma) = x - sigma*eps(z, t)
    with z = x/sqrt(1 + sigma^2) (x = z/alpha: the VP process in EDM's scaling, EDM Sec. 2) and t(sigma) on its discrete table.
    Extra keywords (cond, attn, features) go to the U-Net; with attn/features it returns (D, extras)."""

    def __init__(self, net, sigma_data=None):
        super().__init__()
        config = getattr(net, "config", {})
        self.net, self.sigma_data = net, sigma_data if sigma_data is not None else config.get("sigma_data", SIGMA_DATA)
        self.predicts_eps = config.get("arch") == "ddpm-diffusers"
        self.full_precision = False              # a frozen teacher (freeze): fp32 whatever autocast surrounds it

    def forward(self, x, sigma, cond=None, **extras):
        if self.full_precision:                  # the teacher's roll-out in training = its evaluation, in fp32
            with no_autocast(x):
                return self.denoise(x.float(), sigma, cond, **extras)
        return self.denoise(x, sigma, cond, **extras)

    def denoise(self, x, sigma, cond=None, **extras):
        sigma = as_batch(sigma, x)
        if self.predicts_eps:
            eps = self.net(x / (1 + sigma**2).sqrt(), self.net.t_from_sigma(sigma.flatten()), cond, **extras)
            return x - sigma * eps.float()
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        out = self.net(c_in * x, c_noise.flatten(), cond, **extras)
        F_x, ext = out if isinstance(out, tuple) else (out, None)
        D_x = c_skip * x + c_out * F_x.float()
        return (D_x, ext) if ext is not None else D_x


def freeze(D):
    """D as a frozen teacher: eval mode, no gradients, and fp32 with autocast off inside it (full_precision), so
    that its roll-out in a bf16 training step is the computation its evaluation runs (on CUDA with TF32)."""
    D.eval().requires_grad_(False)
    D.full_precision = True
    return D


def vp_from_sigma(sigma):
    """(alpha, s) of the VP process with the same signal-to-noise ratio: alpha^2 + s^2 = 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64 if not torch.is_tensor(sigma) else sigma.dtype)
    alpha = 1 / (1 + sigma**2).sqrt()
    return alpha, sigma * alpha


def sigma_from_vp(alpha, s):
    return s / alpha


def vp_predict(D, z, alpha, s, cond=None, **extras):
    """The VP adapter (x = z/alpha, sigma = s/alpha: EDM Sec. 2 and Eq. 4): x0_hat = D(z/alpha, s/alpha),
    eps_hat = (z - alpha*x0_hat)/s, v_hat = alpha*eps_hat - s*x0_hat. alpha and s: scalars or per-sample tensors.
    Returns (x0_hat, eps_hat, v_hat), plus the extras dict when attn/features are asked for."""
    alpha, s = as_batch(alpha, z), as_batch(s, z)
    out = D(z / alpha, s / alpha, cond, **extras)
    x0, ext = out if isinstance(out, tuple) else (out, None)
    eps = (z - alpha * x0) / s
    v = alpha * eps - s * x0
    return (x0, eps, v, ext) if ext is not None else (x0, eps, v)


# ----------------------------------------------------------------------------------------------
# 2. Noise schedules
# ----------------------------------------------------------------------------------------------

def karras_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """EDM Eq. 5: n points from sigma_max (i = 0) down to sigma_min (i = n-1), float64."""
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def cosine_logsnr(t, logsnr_min=-20.0, logsnr_max=20.0):
    """PD's cosine schedule in log-SNR form: logsnr(t) = -2 ln tan(a t + b), t in [0, 1]."""
    b = math.atan(math.exp(-logsnr_max / 2))
    a = math.atan(math.exp(-logsnr_min / 2)) - b
    return -2 * torch.log(torch.tan(a * torch.as_tensor(t, dtype=torch.float64) + b))


def cosine_alpha_sigma(t, logsnr_min=-20.0, logsnr_max=20.0):
    """alpha_t, s_t of the cosine schedule: alpha^2 = sigmoid(logsnr), s^2 = sigmoid(-logsnr)."""
    logsnr = cosine_logsnr(t, logsnr_min, logsnr_max)
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def ddpm_alpha_bar(T=1000, beta_1=1e-4, beta_T=0.02):
    """Discrete DDPM table (Ho et al. 2020, linear betas): alpha_bar[t] for t = 0..T, alpha_bar[0] = 1."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def sigma_from_alpha_bar(alpha_bar):
    """sigma_t = s_t/alpha_t = sqrt((1 - alpha_bar_t)/alpha_bar_t)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


# ----------------------------------------------------------------------------------------------
# 3. Samplers: sampler(D, x, sigmas, callback=None, **solver options) -> x at sigmas[-1]
#    x starts at sigmas[0] (x = sigma_max*eps for pure noise); sigmas decrease, may end in 0.
#    callback(i, x) is called after step i. No method's idea in here: a method's own first step or
#    a wrapper around D lives in its file (SFD's analytical first step and thresholding: sfd.py).
# ----------------------------------------------------------------------------------------------

def sample_euler(D, x, sigmas, callback=None):
    """Euler = DDIM (eta 0) in sigma: d = (x - D(x, s_i))/s_i; x <- x + (s_{i+1} - s_i)*d."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = (x - D(x, t_cur)) / t_cur
        x = x + (t_next - t_cur) * d                        # Euler step.
        if callback:
            callback(i, x)
    return x


def sample_heun(D, x, sigmas, callback=None, euler_last=False):
    """EDM Algorithm 1 (deterministic): Euler predictor, trapezoidal corrector unless s_{i+1} = 0.
    euler_last: no corrector on the last step either (EDM's rule for its step to 0, carried over to a
    grid that ends at sigma_min: a corrector there divides the network's error by sigma_min)."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d_cur = (x - D(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur               # Euler step.
        if t_next > 0 and not (euler_last and i == len(sigmas) - 2):   # Apply 2nd order correction.
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        if callback:
            callback(i, x)
    return x


def dpmpp_step(x, t_cur, t_next, D0, history, order):
    """One DPM-Solver++ multistep update from t_cur to t_next > 0 (Lu et al., arXiv:2211.01095, Alg. 2), given
    D0 = D(x, t_cur) and history = [(D_-1, h_-1), (D_-2, h_-2), ...] (most recent first),
    with h = lambda_next - lambda_cur in lambda = -ln(sigma); order <= 1 + len(history).
    The third-order D2 term uses -phi3 exactly as the reference implementations do (DPM-Solver,
    k-diffusion, diffusers): a Taylor expansion gives D2 ~ h^2 D''/2, whose exact weight would be
    -2*phi3, so that step's local error is O(h^3), not O(h^4) (tests/test_common.py measures it).
    Kept as written so fewstep's teacher solver is the one the papers used."""
    h = math.log(t_cur) - math.log(t_next)
    phi1 = math.expm1(-h)
    if order == 1:                                                   # = DDIM / Euler in lambda
        return (t_next / t_cur) * x - phi1 * D0
    (D_m1, h_m1), *older = history
    r0 = h_m1 / h
    D1_0 = (D0 - D_m1) / r0
    if order == 2:
        return (t_next / t_cur) * x - phi1 * D0 - 0.5 * phi1 * D1_0
    (D_m2, h_m2), *_ = older
    r1 = h_m2 / h
    D1_1 = (D_m1 - D_m2) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return (t_next / t_cur) * x - phi1 * D0 + phi2 * D1 - phi3 * D2


def dpmpp_order(i, n, order=3, lower_order_final=True):
    """Order of step i (0-based) of n: the warm-up i + 1 while below `order`, then `order`, lowered to n - i on the
    last steps (SFD authors' dpm_pp_sampler, sfd-main/solvers.py; LuChengTHU/dpm-solver's multistep warm-up)."""
    if i + 1 < order:
        return i + 1
    return min(order, n - i) if lower_order_final else order


def sample_dpmpp(D, x, sigmas, callback=None, order=3, lower_order_final=True):
    """DPM-Solver++(2M/3M), data prediction, multistep (Lu et al. 2022, arXiv:2211.01095, Alg. 2).
    Order ramps up 1, 2, 3 at the start and, with lower_order_final, down at the end: that keeps
    few-step sampling stable; the first-order start and end steps make the global order 2
    asymptotically, though each step in between is third order. The order of step i of n is the
    DPM-Solver and SFD authors' rule (dpmpp_order): 3M on 2 steps is [1, 2], not Euler's [1, 1]."""
    sigmas = [float(s) for s in sigmas]
    n = len(sigmas) - 1
    history = []                                                     # (D, h) of past steps, newest first
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        D0 = D(x, t_cur)
        if t_next == 0:
            x = D0                                                   # lambda = inf: land on the denoised image
        else:
            k = min(dpmpp_order(i, n, order, lower_order_final), len(history) + 1)
            x = dpmpp_step(x, t_cur, t_next, D0, history, k)
            history = [(D0, math.log(t_cur / t_next))] + history[:1]
        if callback:
            callback(i, x)
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": lambda D, x, sigmas, callback=None, **kw: sample_heun(D, x, sigmas, callback, euler_last=True, **kw),
    "dpm2m": lambda D, x, sigmas, callback=None, **kw: sample_dpmpp(D, x, sigmas, callback, order=2, **kw),
    "dpm3m": lambda D, x, sigmas, callback=None, **kw: sample_dpmpp(D, x, sigmas, callback, order=3, **kw),
}


SAMPLER_NAMES = {"euler": "Euler", "heun": "Heun", "dpm2m": "DPM-Solver++(2M)", "dpm3m": "DPM-Solver++(3M)"}


def teacher_sigmas(sampler, nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """The Karras grid sigma_max -> sigma_min that spends exactly nfe network calls with this sampler:
    nfe steps (Heun: (nfe+1)/2 steps, two calls each but the last), ending at sigma_min without a final
    denoising call, the few-step convention of DPM-Solver and SFD (denoise_to_zero=False). EDM's extra
    step to sigma = 0 would spend one of very few calls on noise of std 0.002, below one uint8 level."""
    if nfe < 1 or (sampler == "heun" and nfe % 2 == 0):
        raise UserError(f"{SAMPLER_NAMES.get(sampler, sampler)} cannot spend exactly {nfe} network calls"
                        + (" (Heun needs an odd NFE: two calls per step, one on the last)" if sampler == "heun" else ""))
    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
    return karras_sigmas(steps + 1, sigma_min, sigma_max)


# ----------------------------------------------------------------------------------------------
# 4. The compact U-Net (Ho et al. 2020, arXiv:2006.11239; Dhariwal & Nichol 2021, arXiv:2105.05233)
# ----------------------------------------------------------------------------------------------

NET_CONFIGS = {
    # ~0.1 M parameters: runs in seconds, for tests only.
    "smoke": dict(ch=16, mults=(1, 2), blocks=1, attn_res=(16,), heads=1, dropout=0.0),
    # ~1.5 M parameters: trains on a 2-core CPU in minutes (attention at 8x8: at 16x16 it halves the speed).
    "lab": dict(ch=32, mults=(1, 2, 2, 2), blocks=1, attn_res=(8,), heads=2, dropout=0.0),
    # DDPM's CIFAR-10 U-Net: 128 channels, 1,2,2,2, two res blocks, attention at 16x16, ~36 M.
    "paper": dict(ch=128, mults=(1, 2, 2, 2), blocks=2, attn_res=(16,), heads=1, dropout=0.1),
}


def timestep_embedding(c_noise, dim, max_period=10_000):
    """Sinusoidal embedding of the noise level (Transformer / DDPM positional embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def group_norm(ch):
    """GroupNorm with 32 groups (DDPM), fewer for narrow layers (at least 4 channels a group)."""
    groups = max(g for g in range(1, 33) if ch % g == 0 and ch // g >= 4)
    return nn.GroupNorm(groups, ch, eps=1e-6)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """DDPM res block; the noise embedding is added after conv1. An optional extra condition
    enters as AdaGN, h = (1 + z_scale)*GN(h) + z_shift, through a zero-initialised linear
    map: a network with the extra input starts out computing exactly what it did without."""

    def __init__(self, cin, cout, emb_dim, cond_dim=0, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.cond = zero_init(nn.Linear(cond_dim, 2 * cout)) if cond_dim else None
        self.norm2, self.drop = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, cond=None):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.norm2(h)
        if self.cond is not None and cond is not None:
            z_scale, z_shift = self.cond(cond)[:, :, None, None].chunk(2, dim=1)
            h = (1 + z_scale) * h + z_shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, written out so that its attention
    probabilities softmax(Q K^T / sqrt(d)) can be returned (SFERD reads them)."""

    def __init__(self, ch, heads, name):
        super().__init__()
        self.heads, self.name = heads, name
        self.norm, self.qkv = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x, record=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        with no_autocast(x):                                # logits and softmax in fp32 under bf16 autocast too
            logits = torch.einsum("bhcq,bhck->bhqk", q.float(), k.float()) / math.sqrt(C // self.heads)
            attn = logits.softmax(dim=-1)                   # B x heads x queries x keys
        if record is not None:
            record[self.name] = attn
        h = torch.einsum("bhqk,bhck->bhcq", attn.to(v.dtype), v).reshape(B, C, H, W)
        return x + self.proj(h)


class Level(nn.Module):
    """One resolution step of the U-Net: a res block, then self-attention at attn_res."""

    def __init__(self, cin, cout, emb_dim, cond_dim, dropout, attn_name=None, heads=1):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cond_dim, dropout)
        self.attn = AttnBlock(cout, heads, attn_name) if attn_name else None

    def forward(self, h, emb, cond, record):
        h = self.res(h, emb, cond)
        return self.attn(h, record) if self.attn is not None else h


class UNet(nn.Module):
    """F(x, c_noise[, cond]) of DDPM's CIFAR-10 architecture, sized by the config.

    forward()          -> the output (same shape as x)
    encode()/decode()  -> the two halves, so another network can reuse the encoder
    forward(..., attn=NAME) also returns that attention block's probabilities,
    forward(..., features=True) also returns the last hidden map before the output conv.
    """

    def __init__(self, in_ch=3, res=32, ch=128, mults=(1, 2, 2, 2), blocks=2, attn_res=(16,), heads=1,
                 dropout=0.1, cond_dim=0):
        super().__init__()
        self.config = dict(arch="fewstep", in_ch=in_ch, res=res, ch=ch, mults=tuple(mults), blocks=blocks,
                           attn_res=tuple(attn_res), heads=heads, dropout=dropout, cond_dim=cond_dim)
        emb_dim, self.ch = 4 * ch, ch
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        level = lambda cin, cout, r, name: Level(cin, cout, emb_dim, cond_dim, dropout,
                                                 name if r in attn_res else None, heads)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skip_ch, c, r = nn.ModuleList(), [ch], ch, res
        for i, m in enumerate(mults):
            for j in range(blocks):
                self.down.append(level(c, m * ch, r, f"enc{r}.{j}"))
                c = m * ch
                skip_ch.append(c)
            if i < len(mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))   # downsample
                skip_ch.append(c)
                r //= 2
        self.mid = nn.ModuleList([Level(c, c, emb_dim, cond_dim, dropout, f"mid{r}", heads),   # DDPM: res, attn, res
                                  Level(c, c, emb_dim, cond_dim, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for j in range(blocks + 1):
                self.up.append(level(c + skip_ch.pop(), m * ch, r, f"dec{r}.{j}"))
                c = m * ch
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
                r *= 2
        self.norm_out = group_norm(c)
        self.conv_out = zero_init(nn.Conv2d(c, in_ch, 3, padding=1))

    @property
    def attn_names(self):
        """Names of the self-attention blocks in execution order, e.g. ['enc16.0', ..., 'dec16.2']."""
        return [m.name for m in self.modules() if isinstance(m, AttnBlock)]

    def encode(self, x, c_noise, cond=None, record=None):
        """Input conv and down path: returns (h, skips, emb)."""
        emb = self.emb(timestep_embedding(c_noise, self.ch))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb, cond, record) if isinstance(block, Level) else block(h)
            skips.append(h)
        return h, skips, emb

    def decode(self, h, skips, emb, cond=None, record=None):
        """Middle and up path: returns the last hidden feature map (input of the output conv)."""
        skips = list(skips)
        for block in self.mid:
            h = block(h, emb, cond, record)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, cond, record) if isinstance(block, Level) else block(h)
        return F.silu(self.norm_out(h))

    def forward(self, x, c_noise, cond=None, attn=None, features=False):
        record = {} if attn is not None else None
        if attn is not None and attn not in self.attn_names:
            raise UserError(f"no attention block named {attn!r}; this U-Net has {', '.join(self.attn_names)}")
        h, skips, emb = self.encode(x, c_noise, cond, record)
        feat = self.decode(h, skips, emb, cond, record)
        out = self.conv_out(feat)
        if attn is None and not features:
            return out
        extras = {}
        if attn is not None:
            extras["attn"] = record[attn]
        if features:
            extras["features"] = feat
        return out, extras


def build_net(config, **overrides):
    """The network of a stored config (a checkpoint's 'net_config', any net's .config), with optional
    changes: fewstep's UNet, EDM's SongUNet or DDPM's U-Net (section 13), by config['arch']."""
    arch = config.get("arch", "fewstep")
    if arch == "ddpm-diffusers":
        return DDPMUNet({**config["unet"], **overrides}, config["scheduler"])
    kwargs = {k: v for k, v in {**config, **overrides}.items() if k != "arch"}
    return SongUNet(**kwargs) if arch == "edm-songunet" else UNet(**kwargs)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# 5. EMA (EDM's ema_halflife_kimg)
# ----------------------------------------------------------------------------------------------

def ema_beta(batch_size, halflife_images):
    """EMA decay per step for a half-life counted in images (EDM's ema_halflife_kimg)."""
    return 0.5 ** (batch_size / max(halflife_images, 1e-8))


@torch.no_grad()
def ema_update(ema, model, beta):
    """theta_ema <- beta*theta_ema + (1 - beta)*theta (buffers are copied)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------
# 6. The training loop: every method's and the teacher's (EDM's training_loop / loss split); every resume
#    goes through resume_from
# ----------------------------------------------------------------------------------------------

def constant_lr(lr, done, total):
    return lr


def warmup_lr(warmup, batch):
    """EDM's lr_rampup: the lr grows linearly over the first `warmup` images (counted after the step)."""
    return lambda lr, done, total: lr * min(1.0, (done + batch) / max(warmup, 1))


@dataclass
class Budget:
    """How long and how fast train_loop trains. total: the run's length in unit ("images", "trajectories" or
    "updates"); batch: the global batch; lr: one per param group, or one for all; ckpt_every: units between
    checkpoints; schedule(lr, done, total) -> lr; clip: max gradient norm (None: no clipping); stop_after: stop
    early, resumable (time-sliced runs, tests)."""
    total: int
    unit: str
    batch: int
    lr: float | list
    ckpt_every: int
    schedule: Callable = constant_lr
    clip: float | None = None
    stop_after: int | None = None


@dataclass
class Run:
    """What a train_loop run keeps besides the optimizer, and saves in its checkpoint: path, of kind, with settings
    (what the weights depend on: checked on resume). nets: {name: module}, saved, and broadcast from rank 0 at the
    start. gen: this rank's generator (the batches and the loss's draws; saved per rank). emas: (ema, model, beta),
    updated in order after each optimizer step. shared_rngs: {name: generator} drawn alike on every rank (saved).
    resume: a checkpoint of this run to continue (resume_from) or None. before_step(step): called before each update
    (sferd.py unfreezes its student halfway). desc: the run's name on its progress bar and log lines."""
    path: Path
    kind: str
    settings: dict
    nets: dict
    gen: torch.Generator
    emas: Sequence = ()
    shared_rngs: dict = field(default_factory=dict)
    resume: dict | None = None
    before_step: Callable | None = None
    desc: str = "train"


def train_loop(pg, loss, data, student, teacher, opt, budget, run):
    """Train on loss for budget (a Budget) and return the run's totals (see the end); run (a Run): what is saved
    and resumed. The steps every method shares are here: the lr schedule, drawing the batch, the loss, the optimizer
    step(s) with the gradient sync of several processes (DDP) and the EMAs, the log (progress bar, loss curve) and the
    checkpoints. The losses are read from the device once per logging interval (settle: the loss curve, and every
    rank stops together when any rank's loss is not finite), never per step.

    loss(student, teacher, x, gen): the method's algorithm for one batch x; it draws the rest from gen (run.gen).
        Returns a loss, (loss, {name: part}), or yields losses, one optimizer step each (SFD steps after every
        student step).
    data: the training images (a batch: random_batch, in [-1, 1]), or a shape: a batch of unit noise of that shape."""
    params = [p for g in opt.param_groups for p in g["params"]]
    lrs = budget.lr if isinstance(budget.lr, (list, tuple)) else [budget.lr] * len(opt.param_groups)
    per_step = 1 if budget.unit == "updates" else budget.batch          # images, trajectories: one per sample
    s = dict(step=0, done=0, images=0, seconds=0.0, loss_start=None, loss_avg=None, curve=[], curve_names=[], acc={})
    if run.resume is not None:
        restore(pg, opt, run, s, budget)
    for module in run.nets.values():
        pg.broadcast(module)
        pg.prepare(module)                                       # --channels-last, --compile
    total, local = budget.total, pg.batch(budget.batch)
    stop = total if budget.stop_after is None else min(total, budget.stop_after)
    window = max(1, -(-total // per_step) // 100)               # loss curve: about 100 window means
    bar = tqdm(total=total, initial=s["done"], unit={"images": "img", "updates": "it"}.get(budget.unit, "traj"),
               disable=not pg.main, desc=run.desc, unit_scale=per_step > 1)
    t0, next_ckpt, pending = time.time() - s["seconds"], s["done"] + budget.ckpt_every, []
    every = 1 if pg.device.type == "cpu" else min(window, SETTLE_EVERY)    # a read costs a host sync on a GPU only
    with StopSignals() as signals:
        while s["done"] < stop:
            if run.before_step:
                run.before_step(s["step"])
            for group, lr in zip(opt.param_groups, lrs):                  # the lr schedule
                group["lr"] = budget.schedule(lr, s["done"], total)
            if torch.is_tensor(data):                                      # draw the batch
                x = random_batch(data, local, run.gen)
                x = (to_float(x) if x.dtype == torch.uint8 else x).to(pg.device)
            else:
                x = torch.randn((local, *data), generator=run.gen).to(pg.device)
            with autocast(pg.device):
                out = loss(student, teacher, x, run.gen)                   # the method's loss
            values, parts = optimizer_steps(pg, out, opt, params, budget.clip, run.emas)    # backward, step, EMAs
            s["step"] += 1
            s["done"] += per_step
            s["images"] += budget.batch
            pending.append((s["step"], s["images"], s["done"], values, parts))
            signum = signals.signum if pg.world == 1 else 0     # several processes: they agree in settle
            if s["step"] % every == 0 or s["done"] >= stop or s["done"] >= next_ckpt or signum:     # log
                shown, signum = settle(pg, s, pending, window, total, signals.signum)  # one host sync per interval
                bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
            s["seconds"] = time.time() - t0
            bar.update(per_step)
            if s["done"] >= next_ckpt and s["done"] < stop:               # checkpoint
                next_ckpt += budget.ckpt_every
                save_run(pg, opt, run, s, False)
            if signum:                                   # SIGTERM / SIGINT: this update done, its checkpoint, one line
                bar.close()
                save_run(pg, opt, run, s, s["done"] >= total)
                raise Stopped(f"stopped by {signal.Signals(signum).name} after {s['done']:,} of {total:,} "
                              f"{budget.unit}; checkpoint {run.path} written; continue with `{resume_command(pg.world)}`",
                              signum)
    bar.close()
    settle(pg, s, pending, window, total)
    for module in run.nets.values():
        pg.check_in_sync(module)
    save_run(pg, opt, run, s, s["done"] >= total)
    return dict(s, finished=s["done"] >= total)


def optimizer_steps(pg, out, opt, params, clip=None, emas=()):
    """The update(s) of one batch: out is what a method's loss returned (a loss, (loss, parts) or an
    iterator of losses, stepped one by one). Backward with the gradient averaging of several processes
    overlapped (Dist.grad_sync), clipping, step, EMAs. Returns (the losses, the last parts dict) as device
    tensors: train_loop reads them once per logging interval (a read here would wait for the GPU every step)."""
    steps = iter([out]) if torch.is_tensor(out) or isinstance(out, tuple) else out
    values, parts = [], {}
    while True:
        with autocast(params[0].device):
            out = next(steps, None)
        if out is None:
            return values, parts
        loss, parts = out if isinstance(out, tuple) else (out, {})
        opt.zero_grad(set_to_none=True)
        sync = pg.grad_sync(params)
        loss.backward()
        if sync is not None:
            sync.wait()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        for ema, model, beta in emas:
            ema_update(ema, model, beta)
        values.append(loss.detach())


def random_batch(images, batch_size, generator):
    """A random minibatch (uint8), drawn with replacement: its only state is the generator's,
    so a resumed run draws exactly what an uninterrupted one would have."""
    return images[torch.randint(len(images), (batch_size,), generator=generator)]


def resume_from(path, kind, resume, pg=None):
    """train_loop's resume: the checkpoint at path when --resume and it exists, else None (start over; with pg,
    a --resume that finds nothing says so: resume_note)."""
    if pg is not None:
        resume_note(pg, resume, path)
    return load_checkpoint(path, kind) if resume and Path(path).exists() else None


def resume_note(pg, resume, *paths):
    """--resume where none of a run's checkpoint files exists: one line, in the same words in every script."""
    if resume and paths and not any(Path(p).exists() for p in paths):
        pg.log(f"--resume: no checkpoint at {paths[0]}, starting from scratch")


# ----------------------------------------------------------------------------------------------
# 7. The shared teacher: EDM training (EDM Sec. 5, Table 1 "Ours"), and a student initialised from it
# ----------------------------------------------------------------------------------------------

TEACHER_PRESETS = {
    # images: training length; warmup: lr ramp; ema: EMA half-life; all counted in images.
    "smoke": dict(images=512, batch=32, lr=2e-3, warmup=128, ema=256, ckpt_every=256, grad_clip=1.0, minutes=0.1),
    "lab": dict(images=76_800, batch=64, lr=2e-3, warmup=5_000, ema=10_000, ckpt_every=12_800, grad_clip=1.0, minutes=12),
    # EDM's CIFAR-10 recipe: 200 M images, batch 512, lr 1e-3, warmup 10 M, EMA half-life 0.5 M.
    "paper": dict(images=200_000_000, batch=512, lr=1e-3, warmup=10_000_000, ema=500_000, ckpt_every=5_000_000,
                  grad_clip=1.0, minutes=60 * 48),
}


P_MEAN, P_STD = -1.2, 1.2      # EDM's training noise distribution: ln sigma ~ N(P_mean, P_std^2)


def edm_loss(D, x0, generator=None):
    """EDM Eq. 8 / Table 1: lambda(sigma)*|D(x0 + sigma*n, sigma) - x0|^2, ln sigma ~ N(P_mean, P_std^2),
    lambda = (sigma^2 + sd^2)/(sigma*sd)^2. Returns the batch mean."""
    rnd = torch.randn(x0.shape[0], 1, 1, 1, generator=generator).to(x0.device)
    sigma = (rnd * P_STD + P_MEAN).exp()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    n = torch.randn(x0.shape, generator=generator).to(x0.device) * sigma
    return (weight * (D(x0 + n, sigma) - x0) ** 2).mean()


def teacher_dir(dataset, preset):
    return RUNS / dataset_slug(dataset) / f"teacher-{preset}"


def train_teacher(dataset="fashion", preset="lab", out=None, data_dir=None, seed=0, device=None,
                  batch_size=None, resume=False, images=None, data=None):
    """Train the shared teacher; returns the path of teacher.pt. Resumable from out/checkpoint.pt. One run at a
    time in out (its lock; load_teacher waits for it). data: the images, if already loaded."""
    cfg = dict(TEACHER_PRESETS[preset])
    cfg["batch"] = batch_size or cfg["batch"]
    cfg["images"] = images or cfg["images"]
    out = prepare_out_dir(out or teacher_dir(dataset, preset))
    with folder_lock(out):
        return _train_teacher(dataset, preset, out, data_dir, seed, device, cfg, resume, data)


def _train_teacher(dataset, preset, out, data_dir, seed, device, cfg, resume, data):
    pg = Dist(device)
    if data is None:
        data, _ = load_dataset(dataset, data_dir)
    seed_all(seed)
    net = UNet(in_ch=data.shape[1], res=data.shape[2], **NET_CONFIGS[preset]).to(pg.device)
    ema = build_net(net.config).to(pg.device).requires_grad_(False)
    D = Denoiser(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(seed * 1000 + pg.rank)      # each process its own data/noise
    ckpt_path = out / "checkpoint.pt"
    ck = resume_from(ckpt_path, "teacher-training", resume, pg)
    ema.load_state_dict(net.state_dict())
    pg.log(f"teacher: {dataset}, preset {preset}, {count_params(net) / 1e6:.2f} M params, "
           f"{cfg['images']:,} images, batch {cfg['batch']}, {pg.world} process(es) on {pg.device}")
    budget = Budget(cfg["images"], "images", cfg["batch"], cfg["lr"], cfg["ckpt_every"], clip=cfg["grad_clip"],
                    schedule=warmup_lr(cfg["warmup"], cfg["batch"]))
    net.train()
    run = train_loop(pg, lambda D, _, x0, gen: edm_loss(D, x0, gen), data, D, None, opt, budget, Run(
        ckpt_path, "teacher-training", dict(seed=seed, batch=cfg["batch"], dataset=dataset), dict(net=net, ema=ema), gen,
        emas=[(ema, net, ema_beta(cfg["batch"], cfg["ema"]))], resume=ck, desc="teacher"))
    done, seconds = run["images"], run["seconds"]
    path = out / "teacher.pt"
    if pg.main:
        save_checkpoint(path, "teacher", net_config=ema.config, ema=ema.state_dict(), dataset=dataset, preset=preset,
                        images=done, seconds=seconds)
        teacher = Denoiser(ema.eval())
        x = PerSampleNoise(EVAL_SEED, range(64), pg.device).randn(*data.shape[1:]) * SIGMA_MAX
        with torch.no_grad():
            grid = sample_dpmpp(teacher, x, teacher_sigmas("dpm3m", 35))
        save_grid(grid, out / "samples.png", nrow=8)
        save_curves(out, [curve_of("teacher", run)])
        mem = (f", peak {torch.cuda.max_memory_allocated(pg.device) / 2**30:.2f} GiB on the GPU"
               if pg.device.type == "cuda" else "")
        pg.log(f"teacher: {done:,} images in {seconds / 60:.1f} min ({done / seconds:.0f} img/s{mem}), "
               f"{count_params(ema) / 1e6:.2f} M params, ranks in sync; saved {path}, {out / 'samples.png'} and loss.png")
    pg.barrier()
    return path


def student_from(teacher_net, cond_dim=0):
    """A trainable copy of the teacher's U-Net, optionally with a zero-initialised extra condition
    input (so it starts out computing exactly what the teacher computes; fewstep's U-Net only)."""
    if cond_dim:
        require_arch(teacher_net, ("fewstep",), "this method feeds an extra condition through the student's U-Net")
    net = build_net(teacher_net.config, **({"cond_dim": cond_dim} if cond_dim else {}))
    net = net.to(next(teacher_net.parameters()).device)
    missing, unexpected = net.load_state_dict(teacher_net.state_dict(), strict=False)
    assert not unexpected and all(".cond." in k for k in missing), (missing, unexpected)
    return net.train().requires_grad_(True)


# ==============================================================================================
# PART B: machinery. A method reader may skip everything below: errors and the command line, data, run folders,
# checkpoints, locks and stop signals, fingerprints, several processes (Dist, GradSync), autocast, plots, the
# published teachers' readers, the bench. Nothing below is an algorithm of a paper.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 8. Errors and the shared command line
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input (unknown dataset, impossible --nfe, missing or corrupt file, NaN loss):
    reported as one line on stderr with a non-zero exit, never as a traceback."""
    prefix, exit_code = "error: ", 2


class Stopped(UserError):
    """A training run stopped by SIGTERM or SIGINT after writing its checkpoint: one line, exit 128 + signal."""
    prefix = ""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


def main_guard(main):
    """Run main(); a UserError becomes one line on stderr and exit status 2 (a Stopped run: 128 + the signal):
    on a line of its own (an active progress bar is closed first) and, under torchrun, printed by rank 0 only;
    every rank exits with it."""
    try:
        main()
    except UserError as e:
        close_bars()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{e.prefix}{e}", file=sys.stderr)
        leave_group(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted (checkpoints written so far are kept; rerun with --resume)", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:                 # a collective that timed out, or whose peer is gone (gloo)
        line = collective_failure(e)
        if line is None:
            raise
        close_bars()
        if line:
            print(f"error: {line}", file=sys.stderr)
        leave_group(2)


def leave_group(code):
    """Exit with code; under torchrun, at once (os._exit, once stdout and stderr are flushed): a normal exit tears
    down gloo's threads while the other ranks are leaving too, and one in a few such processes then ended by SIGABRT
    ("terminate called without an active exception") instead of its exit status. Locks are the OS's, released
    with the process; nothing else waits for the interpreter's exit. The other ranks give rank 0 time to print first."""
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.get_rank() != 0:          # rank 0 prints the line: leaving first, another rank would have torchrun end
            time.sleep(2.0)               # rank 0 before it has printed it
        os._exit(code)
    sys.exit(code)


def close_bars():
    for bar in list(getattr(tqdm, "_instances", ())):         # a bar mid-line would share the error's line
        bar.close()


def collective_failure(e):
    """The one line of a failed collective (gloo raises RuntimeError; NCCL's watchdog aborts the process itself
    after the same timeout, with its own message): a timeout names this rank and FEWSTEP_DIST_TIMEOUT; a peer
    that ended first gives "" (it printed its own error, or torchrun's summary names it); anything else None."""
    text, timeout = str(e), os.environ.get("FEWSTEP_DIST_TIMEOUT", DIST_TIMEOUT)
    if "Timed out waiting" in text or "timed out" in text.lower() and "collective" in text.lower():
        return (f"rank {os.environ.get('RANK', 0)} waited more than {timeout} s for the other processes in a collective "
                "operation: another process is stuck, failed or far behind (look above for its error); a longer wait "
                "is set with FEWSTEP_DIST_TIMEOUT=<seconds>")
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return ""
    return None


class Parser(argparse.ArgumentParser):
    """argparse with fewstep's convention for bad input: one line (a UserError), not usage + error."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def checked(kind, ok, what):
    """An argparse type= that parses with kind and refuses values failing ok(v) with 'must be <what>'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
learning_rate = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fid_count = checked(int, lambda v: v == 0 or v >= 2, "0 (no FID) or at least 2 (FID needs 2 images)")


def device_name(text):
    """--device: what torch.device parses (cpu, cuda, cuda:N, mps); its presence is checked by Dist."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: fewstep runs on cpu, cuda or mps")
    return text


def mps_available():
    """Apple's GPU (Metal Performance Shaders) through torch, where this torch build and machine have it."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def default_device():
    """cuda where there is a GPU, else mps on an Apple laptop's GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"


def check_available(device):
    """One line for a device this machine lacks (--device cuda without CUDA, --device mps off a Mac's GPU)."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if kind == "mps" and not mps_available():
        raise UserError(f"--device {device}: MPS (an Apple GPU) is not available on this machine; use --device cpu")


def on_device(t, device):
    """A host tensor (a schedule, float64 on the host) on device in one copy; float32 where the device has no float64
    (MPS), a cast made on the host. Elsewhere the dtype is kept, so the CPU's numbers are those of the host math."""
    device = torch.device(device)
    return (t.float() if device.type == "mps" and t.dtype == torch.float64 else t).to(device)


def dataset_name(text):
    """--dataset: fashion | cifar10 | folder:PATH, checked before anything is loaded."""
    try:
        dataset_shape(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class FewstepParser(Parser):
    """common_parser's parser: after parsing, resolve_common fills in the defaults that depend on other
    flags (--preset on --dataset) and refuses bad --export flags, so every method gets them unchanged."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        resolve_common(ns, Path(self.prog).stem, command_line=args is None, presets=getattr(self, "presets", None),
                       paper_cost=getattr(self, "paper_cost", None))
        return ns, rest


def first_paragraph(doc):
    """A script's --help description: its docstring up to the first blank line (the rest is for the reader of the file)."""
    return doc.strip().split("\n\n")[0]


def shown(value):
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (
        f"{value:g}" if isinstance(value, float) else str(value))


def common_parser(description, nfe_default=4, nfe_type=int, nfe_help="number of function evaluations of the student",
                  presets=None, paper_cost=None):
    """The one CLI convention of every fewstep script; a method adds its own flags after. presets: the
    method's PRESETS ({preset: {key: value}}); every key becomes an attribute of the parsed args, a flag
    left unset (None) taking the preset's value (batch: --batch-size); add them with preset_flag.
    paper_cost: the method's PAPER_COST, what the refusal of a paper run without CUDA estimates from."""
    p = FewstepParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.presets, p.paper_cost = presets, paper_cost
    p.add_argument("--dataset", default="fashion", type=dataset_name,
                   help="fashion | cifar10 | folder:PATH (default: fashion, offline)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the dataset files (CIFAR-10 tarball or batches, Fashion-MNIST .gz)")
    p.add_argument("--nfe", default=nfe_default, type=nfe_type, help=f"{nfe_help} (default: {nfe_default})")
    p.add_argument("--preset", default=None, choices=["smoke", "lab", "paper"],
                   help="smoke: seconds, for tests; lab: a 2-core CPU in minutes; paper: the published setup, CUDA "
                        "(default: paper for --dataset cifar10, lab for fashion and folders)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>/<run name>)")
    p.add_argument("--teacher", default=None, help="teacher: a fewstep teacher.pt, an EDM snapshot .pkl, a diffusers UNet2DModel "
                   "folder, or edm | ddpm (the published CIFAR-10 checkpoints, downloaded once); default: the shared "
                   "teacher of the preset, trained on first use (cifar10 with --preset paper: edm)")
    p.add_argument("--seed", default=0, type=int, help="random seed of training (evaluation noise is fixed separately)")
    p.add_argument("--device", default=None, type=device_name, help="cpu | cuda | cuda:N | mps (default: cuda, else mps, "
                   "else cpu; under torchrun each process takes the GPU of its LOCAL_RANK)")
    p.add_argument("--batch-size", default=None, type=positive_int, help="global batch size (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile every network (training and evaluation)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for every network (faster convolutions "
                   "on recent GPUs)")
    p.add_argument("--bf16-eval", action="store_true", help="sample the student under bf16 autocast in evaluation and "
                   "--export (default: off, fp32, until a GPU shows it leaves FID unchanged; the teacher is always fp32)")
    p.add_argument("--fid-samples", default=None, type=fid_count,
                   help="N, the number of generated images for FID (default: the preset's; 0 skips FID)")
    p.add_argument("--export", default=None, type=int, metavar="N",
                   help="write N samples of the fixed evaluation noise for external FID tools (with --resume: from the "
                        "finished run's student, no retraining) into <run folder>/samples-<N>/ or samples-<N>.npz")
    p.add_argument("--export-format", default="png", help="png: sub-folders of 1,000 PNGs (EDM generate.py's layout, "
                   "default); npz: one uint8 N x H x W x C array arr_0 (the ADM evaluator's format)")
    p.add_argument("--export-dir", default=None, help="folder that receives samples-<N>[.npz] (default: the run folder)")
    return p


def preset_flag(p, key, type, help, flag=None):
    """A flag whose default comes from the preset: --help shows it as "lab X, paper Y"."""
    lab, paper = (shown(p.presets[name][key]) for name in ("lab", "paper"))
    p.add_argument(flag or "--" + key.replace("_", "-"), dest=key, type=type, default=None,
                   help=f"{help} (default: the preset's, lab {lab}, paper {paper})".replace("%", "%%"))


def fill_presets(args, presets):
    """Every preset key becomes an attribute of args unless its flag was given (batch: --batch-size)."""
    for key, value in presets[args.preset].items():
        if key == "batch":
            args.batch = args.batch_size or value
        elif getattr(args, key, None) is None:
            setattr(args, key, value)


def resolve_common(args, method, command_line=True, presets=None, paper_cost=None):
    """What common_parser's flags mean together, checked right after parsing, before any work:
    the preset default of the dataset, the --export flags, and (on a script's own command line) the
    refusal of a paper run on a machine without CUDA unless --device cpu says so."""
    if args.preset is None:                 # the headline command `sfd.py --dataset cifar10` means the paper
        args.preset = "paper" if args.dataset == "cifar10" else "lab"
    if presets:
        fill_presets(args, presets)
    if args.export is not None:
        if args.export <= 0:
            raise UserError(f"--export {args.export}: the number of samples must be positive")
        if args.export_format not in EXPORT_FORMATS:
            raise UserError(f"--export-format {args.export_format!r}: use {' or '.join(EXPORT_FORMATS)}")
        if args.export_dir is not None:     # the place is known now: refuse before training, not after
            check_export_target(Eval.of(args), args.export_dir)
    if command_line and args.preset == "paper" and args.device is None and default_device() != "cuda":
        refuse_paper_on_cpu(method, paper_cost)


@dataclasses.dataclass(frozen=True)
class Eval:
    """What a method's evaluation takes from its command line (common_parser's flags), made in the script by
    Eval.of(args): the teacher it compares with (load_teacher), the dataset of FID's reference statistics, FID's N,
    the sampling batch and precision, and --export. fid.report, teacher_baseline and export_samples take it."""
    dataset: str = "fashion"
    data_dir: str = None
    preset: str = "lab"
    teacher: str = None                   # --teacher (None: the preset's shared teacher)
    device: str = None                    # --device (None: cuda, else mps, else cpu)
    fid_samples: int = None               # FID's N (None: the preset's; 0 skips FID)
    batch_size: int = None                # the sampling batch (None: 250)
    bf16_eval: bool = False
    export: int = None                    # --export N samples in export_format into export_dir (None: the run folder)
    export_format: str = "png"
    export_dir: str = None
    resume: bool = False                  # an existing export, or an evaluated run, is continued (else refused)

    @classmethod
    def of(cls, args):
        """The Eval of parsed args; a flag a script does not have (fid.py --rows: --export) keeps its default."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


EXPORT_FORMATS = ("png", "npz")


def export_target(ev, out):
    """<run folder>/samples-<N>/ (png) or <run folder>/samples-<N>.npz; --export-dir replaces the run folder."""
    root = Path(ev.export_dir) if ev.export_dir else Path(out)
    return root / (f"samples-{ev.export}" + (".npz" if ev.export_format == "npz" else ""))


def check_export_target(ev, out):
    """An existing, non-empty export (or a partial one) is only continued with --resume: nothing is overwritten."""
    target = export_target(ev, out)
    partial = target.with_name(target.name + ".partial.npy")
    if not ev.resume and (target.is_file() or partial.exists() or (target.is_dir() and any(target.iterdir()))):
        raise UserError(f"{target} exists and is not empty: pass --resume to complete it or choose another "
                        "--export-dir (nothing was overwritten)")
    return target


def dataset_slug(name):
    """runs/<slug>/: 'folder:/a/b' becomes 'folder-b'."""
    return "folder-" + Path(name.split(":", 1)[1]).name if name.startswith("folder:") else name


# ----------------------------------------------------------------------------------------------
# 9. Data: uint8 tensors N x C x 32 x 32 in memory (all three datasets are small)
# ----------------------------------------------------------------------------------------------

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Upstream md5 of the .gz files. Debian's package recompresses them, so its files are checked by
# their idx headers instead.
FASHION_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# The published md5 of each extracted batch (the list torchvision and every CIFAR-10 loader carries):
# an extracted batch is a pickle, so it is checked before it is read.
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
}
DOWNLOAD_DIR = Path.home() / ".cache" / "fewstep"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, md5, check=None):
    """Fetch url to path (temp file + rename) and check its md5 (None: only the length the server
    announced, which urlretrieve checks) and, if given, check(temp file), which raises UserError when the file
    does not read as what it should be: nothing that fails a check is cached. One process fetches while the others
    wait for it (the lock path.lock beside it); UserError when offline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock(path.parent, wait="", name=path.name + ".lock"):
        if path.exists():                        # another process fetched it while this one waited
            return path
        tmp = path.with_name(path.name + ".part")
        try:
            print(f"downloading {url} -> {path}", file=sys.stderr)
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not download {url} ({e.__class__.__name__}: {e})") from None
        if md5 is not None and md5sum(tmp) != md5:
            tmp.unlink()
            raise UserError(f"{url}: checksum mismatch (expected md5 {md5}); the download is corrupt")
        if check is not None:
            try:
                check(tmp)
            except UserError as e:
                tmp.unlink(missing_ok=True)
                raise UserError(f"the download of {url} is unusable, so it was not kept ({e})") from None
        os.replace(tmp, path)
    return path


def read_idx(path, magic, count=None):
    """An MNIST-format idx file (.gz): returns a numpy uint8 array; UserError if malformed."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable gzip file ({e})") from None
    ndim = magic - 2048
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        raise UserError(f"{path}: not an idx file with magic number {magic}")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)) or (count is not None and shape[0] != count):
        raise UserError(f"{path}: truncated or inconsistent idx file (header says {shape})")
    return data.reshape(shape)


def load_fashion(split, data_dir=None):
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey, padded with black to 32x32."""
    files = {}
    for kind in ("images", "labels"):
        name, md5 = FASHION_FILES[(split, kind)]
        candidates = [Path(d) / name for d in (data_dir, FASHION_DEBIAN, DOWNLOAD_DIR / "fashion-mnist") if d]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            try:
                found = download(FASHION_URL + name, DOWNLOAD_DIR / "fashion-mnist" / name, md5)
            except UserError as e:
                raise UserError(f"Fashion-MNIST not found ({e}); install it with "
                                "'apt-get install dataset-fashion-mnist' or put the four .gz files in --data-dir") from None
        files[kind] = found
    images = read_idx(files["images"], 2051)
    labels = read_idx(files["labels"], 2049, count=images.shape[0])
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]      # 28x28 -> 32x32, C = 1
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _cifar_batches(split):
    return ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]


class AllowlistUnpickler(pickle.Unpickler):
    """A pickle reader that builds only what its table names, {(module, name): the object built for it}, an entry
    (package, "*") standing for every class under that package. A pickle calls the globals it names, so any other
    (os.system in a crafted __reduce__) is refused before it is called: no file we read runs code. One table per file
    family: CIFAR10_BATCH (below), EDM_SNAPSHOT (section 13), fid.py's TORCHSCRIPT_WEIGHTS. what: the family, for
    the refusal; persistent_load: the reader of data kept beside the pickle (a TorchScript archive's storages)."""

    def __init__(self, file, table, what, persistent_load=None, **kwargs):
        super().__init__(file, **kwargs)
        self.table, self.what = table, what
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module, name):
        found = self.table.get((module, name), self.table.get((module.split(".")[0], "*")))
        if found is None:
            raise UserError(f"refusing {module}.{name}: {name} is not part of {self.what} (it could run code)")
        return found


_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core      # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core
CIFAR10_BATCH = {                  # a dict of bytes, lists and one uint8 numpy array
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct   # the array, protocols 2-4
       for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,                        # ... its class and dtype
    **{(f"numpy.{core}.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer       # the array, protocol 5
       for core in ("core", "_core")},
    ("_codecs", "encode"): codecs.encode,                  # bytes in a protocol-2 pickle (the published batches)
}


def _unpickle(f, where):
    try:
        d = AllowlistUnpickler(f, CIFAR10_BATCH, "a CIFAR-10 batch", encoding="bytes").load()
        return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], np.int64)
    except UserError as e:     # a global the table refuses
        raise UserError(f"{where}: not a CIFAR-10 python batch ({e})") from None
    except Exception as e:     # a corrupt batch can fail in many ways; all mean the same to the user
        detail = f": {e}" if isinstance(e, pickle.UnpicklingError) else ""
        raise UserError(f"{where}: not a CIFAR-10 python batch ({e.__class__.__name__}{detail})") from None


def load_cifar10(split, data_dir=None):
    """CIFAR-10 (Krizhevsky 2009), python version: the tarball (md5-checked) or its extracted batches."""
    dirs = [Path(data_dir)] if data_dir else []
    dirs.append(DOWNLOAD_DIR)
    for d in dirs:
        for batch_dir in (d / "cifar-10-batches-py", d):
            if all((batch_dir / b).exists() for b in _cifar_batches(split)):
                parts = []
                for b in _cifar_batches(split):
                    if md5sum(batch_dir / b) != CIFAR10_BATCH_MD5[b]:    # before unpickling: never run a stranger's pickle
                        raise UserError(f"{batch_dir / b}: checksum mismatch (expected md5 {CIFAR10_BATCH_MD5[b]}); "
                                        "not a CIFAR-10 python batch, or a corrupt one")
                    with open(batch_dir / b, "rb") as f:
                        parts.append(_unpickle(f, batch_dir / b))
                return _stack(parts)
        tarball = d / "cifar-10-python.tar.gz"
        if tarball.exists():
            return _read_cifar_tarball(tarball, split)
    if data_dir:
        raise UserError(f"--data-dir {data_dir} holds neither cifar-10-python.tar.gz nor the extracted "
                        f"cifar-10-batches-py/ ({', '.join(_cifar_batches(split))})")
    try:
        tarball = download(CIFAR10_URL, DOWNLOAD_DIR / "cifar-10-python.tar.gz", CIFAR10_MD5)
    except UserError as e:
        raise UserError(f"CIFAR-10 not available ({e}); download {CIFAR10_URL} and pass its folder with --data-dir") from None
    return _read_cifar_tarball(tarball, split)


def _read_cifar_tarball(tarball, split):
    if md5sum(tarball) != CIFAR10_MD5:
        raise UserError(f"{tarball}: checksum mismatch (expected md5 {CIFAR10_MD5}); the file is corrupt or not CIFAR-10")
    parts = []
    with tarfile.open(tarball, "r:gz") as tar:
        for b in _cifar_batches(split):
            member = tar.extractfile(f"cifar-10-batches-py/{b}")
            parts.append(_unpickle(member, f"{tarball}:{b}"))
    return _stack(parts)


def _stack(parts):
    images, labels = zip(*parts)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_folder(path, res=32):
    """Any folder of images: RGB, center-cropped to a square, resized to res x res; no labels."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"folder:{path}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"folder:{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    images = []
    for p in tqdm(files, desc=f"reading {folder.name}", disable=len(files) < 1000, leave=False):
        try:
            im = Image.open(p).convert("RGB")
        except OSError as e:
            raise UserError(f"{p}: not a readable image ({e})") from None
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((res, res), Image.BICUBIC)
        images.append(np.asarray(im).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images)), None


def dataset_shape(name):
    """C x H x W of a dataset's images, known without reading them; UserError on an unknown name."""
    if name == "fashion":
        return (1, 32, 32)
    if name == "cifar10" or name.startswith("folder:"):
        return (3, 32, 32)
    raise UserError(f"unknown dataset {name!r}: use fashion, cifar10 or folder:PATH")


def load_dataset(name, data_dir=None, split="train"):
    """(images uint8 N x C x 32 x 32, labels int64 or None) for 'fashion', 'cifar10' or 'folder:PATH'."""
    if name == "fashion":
        return load_fashion(split, data_dir)
    if name == "cifar10":
        return load_cifar10(split, data_dir)
    if name.startswith("folder:"):
        return load_folder(name.split(":", 1)[1])
    raise UserError(f"unknown dataset {name!r}: use fashion, cifar10 or folder:PATH")


def to_float(images):
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8, the way a saved PNG would hold it: +128 then truncation is round-half-up
    of x*127.5 + 127.5, the convention of EDM's generate.py (fid.py quantises with it too)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# 10. Plumbing: seeds, checkpoints, image grids, DDP, autocast
# ----------------------------------------------------------------------------------------------

def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class PerSampleNoise:
    """One generator per sample index (as EDM's StackedRandomGenerator): sample k gets the same
    noise whatever the batch size or the number of processes."""

    def __init__(self, seed, indices, device="cpu"):
        self.device = device
        self.gens = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]

    def randn(self, *shape):
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)

    def randn_like(self, x):
        return self.randn(*x.shape[1:])

    def ahead(self, k, *shape):
        """A noise(x) for a sampler's k steps: the k draws of randn(*shape) that k calls would make, made now and
        moved to the device in one copy, so the sampler's loop copies nothing."""
        drawn = iter(torch.stack([torch.stack([torch.randn(shape, generator=g) for g in self.gens]) for _ in range(k)])
                     .to(self.device) if k else ())
        return lambda x: next(drawn)


def os_cause(e):
    """An OSError in the words a user acts on: no space left, read-only, permission, not a folder."""
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EEXIST: "it exists and is not a folder"}.get(e.errno, e.strerror or str(e))


@contextmanager
def atomic_write(path, suffix=".tmp"):
    """Yield a temp path next to path, renamed over path at the end: an interrupted or failed write never
    replaces a good file. A failed one removes the temp file and is one line naming the cause."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = e                                 # torch.save's zip writer turns ENOSPC into a RuntimeError after it
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None:
            raise UserError(f"could not write {path}: {os_cause(cause)} (the last good file, if any, is kept)") from None
        raise


def prepare_out_dir(path):
    """Create the run folder and test-write it before any work: an --out that is a file, read-only or on
    a full disk fails in the first second with one line, not at the first checkpoint hours in."""
    path = Path(path)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:              # mkdir alone succeeds on a full disk; a write does not
            f.write(b"fewstep")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(f"cannot write to the output folder {path}: {os_cause(e)}") from None
    return path


def run_dir(out, dataset, name):
    """The run folder (out: --out, else runs/<dataset>/<name>), created and test-written (prepare_out_dir), and held by
    this run until it ends (hold_folder): a second run into it is refused."""
    return hold_folder(prepare_out_dir(Path(out) if out else RUNS / dataset_slug(dataset) / name))


_LOCKS = {}                                       # resolved lock file -> its open file, while this process holds it
_HELD = ExitStack()                               # the locks held until this process ends (hold_folder)
atexit.register(_HELD.close)                      # released in order at exit, not by the garbage collector at teardown


def _lock(folder, wait=None, name=".lock"):
    """Take the exclusive OS lock (flock) of folder/name and write this process into it. Held by another process:
    refused in one line naming it, or (wait: what is waited for) a line saying so, then wait; wait "": wait without a
    word (a download, which every process of a job waits for). The OS drops the lock when the process ends, however
    it ends, so a killed run never leaves a stale lock."""
    path = Path(folder) / name
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "another process"
        if wait is None:
            f.close()
            raise UserError(f"{folder} is in use by {holder}: wait for it to finish or choose another --out") from None
        if wait:
            print(f"{folder} is in use by {holder}; waiting for {wait}", file=sys.stderr)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} ({' '.join(['python', Path(sys.argv[0]).name, *sys.argv[1:]])})\n")
    f.flush()
    return f


@contextmanager
def lock(folder, wait=None, name=".lock"):
    """folder/name's lock (_lock) for the length of a with block; one this process already holds is fine (a chain's
    stages, the teacher's rows). The one lock of fewstep: a run's folder (hold_folder), a cache built once for several
    runs (folder_lock: the shared teacher), a download (download). No POSIX locks (Windows): nothing is locked."""
    key = (Path(folder) / name).resolve()
    if fcntl is None or key in _LOCKS:
        yield
        return
    _LOCKS[key] = _lock(folder, wait, name)
    try:
        yield
    finally:
        _LOCKS.pop(key).close()                   # closing the file releases the lock


def hold_folder(folder):
    """One run per folder: this process holds folder's lock until it ends (rank 0 under torchrun: the one that
    writes)."""
    if int(os.environ.get("RANK", 0)) == 0:
        _HELD.enter_context(lock(folder))
    return Path(folder)


def folder_lock(folder, wait=None):
    """folder's lock for the length of a with block, taken by rank 0 under torchrun (the one that writes);
    wait: wait for another holder instead of refusing (see _lock)."""
    return lock(folder, wait) if int(os.environ.get("RANK", 0)) == 0 else nullcontext()


WEIGHT_LIMIT = math.sqrt(torch.finfo(torch.float32).max)    # ~1.8e19: its square overflows float32


def check_weights(payload, path):
    """Refuse to save a blow-up: every float tensor of the payload's networks (all but the optimizer
    state) must be finite and below sqrt(float32 max), beyond which the first square of a forward pass
    (GroupNorm's variance) is inf. A huge lr on the last update would otherwise be saved and evaluated."""
    def tensors(value, name):
        if torch.is_tensor(value):
            yield name, value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from tensors(v, f"{name}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from tensors(v, f"{name}[{i}]")

    for key, value in payload.items():
        if key == "opt":
            continue
        for name, t in tensors(value, key):
            if t.is_floating_point() and t.numel() and not (t.isfinite().all() and t.abs().max() < WEIGHT_LIMIT):
                raise UserError(f"not saving {path}: {name} holds weights that are not finite (max |w| "
                                f"{t.abs().max().item():.3g}); lower the learning rate (the last checkpoint is kept)")


def save_checkpoint(path, kind, **payload):
    """Write a checkpoint atomically (temp file, then rename): an interrupted write never
    replaces a good file. kind names what it holds ('teacher', 'sfd-student', ...)."""
    check_weights(payload, path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:       # a file object: a full disk raises OSError(ENOSPC)
        torch.save({"fewstep": CKPT_FORMAT, "kind": kind, **payload}, f)


_FINGERPRINTS = {}


def fingerprint(path):
    """sha256 of a file's content (of a folder: its files' names and contents, in sorted order), cached per
    path, size and mtime, so a 200 MB teacher is hashed once per process. Caches and resumed runs record
    the teacher by this, not by its path: a moved checkout still matches, a retrained teacher.pt does not."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = (str(path.resolve()), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            if path.is_dir():
                h.update(p.relative_to(path).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def check_same_teacher(ck, path, teacher_sha256):
    """--resume: refuse a checkpoint written with another teacher, or with no record of its teacher
    (one from before fingerprints: it cannot be matched, so it is not trusted)."""
    old = ck.get("teacher_sha256")
    if teacher_sha256 is None:              # a direct call that names no teacher (tests): nothing to compare
        return
    if old is None:
        raise UserError(f"{path} records no teacher fingerprint (written by an older fewstep), so its teacher "
                        "cannot be checked; use another --out, or drop --resume to start over")
    if old != teacher_sha256:
        raise UserError(f"{path} was trained with another teacher (sha256 {old[:12]}, this one {teacher_sha256[:12]}); "
                        "use another --out, or drop --resume to start over")


def load_checkpoint(path, kind=None):
    """Read a checkpoint with weights_only=True; UserError on a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: corrupt or unreadable checkpoint ({e.__class__.__name__}); delete it or pass another") from None
    if not isinstance(ck, dict) or ck.get("fewstep") != CKPT_FORMAT:
        raise UserError(f"{path}: not a fewstep checkpoint (format {CKPT_FORMAT})")
    if kind is not None and ck.get("kind") != kind:
        raise UserError(f"{path} holds a {ck.get('kind')}, not a {kind}")
    return ck


def load_state(module, state, path):
    """load_state_dict with one clear line when the shapes do not match."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not match this network ({first})") from None


def save_grid(x, path, nrow=None):
    """Save images in [-1, 1] as one PNG grid (temp file, then rename)."""
    x = to_uint8(x.detach().cpu())
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(c, ncol * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[k]
    arr = grid.permute(1, 2, 0).numpy()
    with atomic_write(path, ".tmp.png") as tmp:
        Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(tmp)


def font(size=13):
    """Pillow's own font (a scalable one where Pillow has FreeType, else its bitmap font): nothing to install."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):                  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),     # matplotlib's tab10, by hand,
           (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
           (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]   # then tab20's light halves


def nice_ticks(lo, hi, log=False, count=5):
    """Tick values for an axis from lo to hi: 1-2-5 steps (linear, and log axes of less than a decade) or powers
    of ten, with 2 and 5 between them when the axis spans less than two decades (log)."""
    if log and math.log10(hi / lo) >= 1:
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in ((1, 2, 5) if math.log10(hi / lo) < 2 else (1,))]
        return [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)] or [lo, hi]
    raw = (hi - lo) / max(count - 1, 1) or abs(hi) or 1.0
    step = min((m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda v: abs(v - raw))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def plot_lines(series, path, title="", xlabel="", ylabel="", log_x=False, log_y=False, size=(640, 400), marks=None):
    """A line chart as a PNG, drawn with Pillow (fewstep has no plotting library): series {label: [(x, y), ...]},
    one colour and a legend entry each, points marked; log axes on request; marks {x: text}: dashed vertical lines
    (a chain's stage boundaries). Written atomically; returns path."""
    pts = [(x, y) for line in series.values() for x, y in line if math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        raise ValueError("plot_lines: nothing to plot")
    (W, H), f, small = size, font(14), font(12)
    left, right, top, bottom = 70, 20 + 150 * (len(series) > 1), 30 + 18 * bool(title), 50
    scale = lambda v, log: math.log10(v) if log else v
    xs, ys = [scale(x, log_x) for x, _ in pts], [scale(y, log_y) for _, y in pts]
    x0, x1 = min(xs), max(xs) + 1e-12 * (max(xs) == min(xs)) or 1.0
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * (y1 - y0 or abs(y1) or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (W - left - right) * (scale(x, log_x) - x0) / (x1 - x0 or 1.0)
    py = lambda y: H - bottom - (H - top - bottom) * (scale(y, log_y) - y0) / (y1 - y0)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, W - right, H - bottom], outline=(120, 120, 120))
    inv = lambda v, log: 10 ** v if log else v
    for t in nice_ticks(inv(x0, log_x), inv(x1, log_x), log_x):
        draw.line([px(t), H - bottom, px(t), H - bottom + 4], fill=(120, 120, 120))
        draw.text((px(t), H - bottom + 6), f"{t:g}", fill="black", font=small, anchor="ma")
    for t in nice_ticks(inv(y0, log_y), inv(y1, log_y), log_y):
        draw.line([left - 4, py(t), W - right, py(t)], fill=(225, 225, 225))
        draw.text((left - 6, py(t)), f"{t:.4g}", fill="black", font=small, anchor="rm")
    for x, text in (marks or {}).items():
        for y in range(top, H - bottom, 8):
            draw.line([px(x), y, px(x), min(y + 4, H - bottom)], fill=(150, 150, 150))
        draw.text((px(x) + 3, top + 2), text, fill=(90, 90, 90), font=small)
    for k, (label, line) in enumerate(series.items()):
        colour, line = PALETTE[k % len(PALETTE)], [(x, y) for x, y in line if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line([(px(x), py(y)) for x, y in line], fill=colour, width=2)
        for x, y in line if len(line) < 30 else ():
            draw.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=colour)
        if len(series) > 1:
            ly = top + 4 + 18 * k
            draw.line([W - right + 10, ly + 7, W - right + 30, ly + 7], fill=colour, width=3)
            draw.text((W - right + 36, ly), label[:18], fill="black", font=small)
    draw.text((W / 2, H - 18), xlabel, fill="black", font=f, anchor="ma")
    draw.text((8, top - 18 if title else 8), ylabel + (" (log)" if log_y else ""), fill="black", font=f)
    if title:
        draw.text((W / 2, 6), title, fill="black", font=f, anchor="ma")
    with atomic_write(path, ".tmp.png") as tmp:
        img.save(tmp)
    return path


def curve_of(label, run, offset=0):
    """One training run's loss curve for save_curves: (label, column names, rows of window means), its images
    counted from offset (a chain's stages follow each other)."""
    names = run.get("curve_names") or ["images", "loss"]
    return label, names, [[row[0] + offset, *row[1:]] for row in run["curve"]]


def add_run(totals, label, run, images=True):
    """A chain's totals (images, seconds, loss curves) after one more training run, its curve labelled label and
    its images counted on from the chain's; images=False: its seconds only (sferd.py's latent DDPM draws no image)."""
    return dict(images=totals["images"] + (run["images"] if images else 0), seconds=totals["seconds"] + run["seconds"],
                curves=[*totals.get("curves", []), curve_of(label, run, totals["images"])])


def save_curves(folder, curves):
    """folder/loss.csv (stage, images, then every stage's loss parts: window means of the loss the loop reported)
    and folder/loss.png (the loss against images on a log scale: one line per stage, or per part of a single
    stage, stage boundaries marked)."""
    parts = list(dict.fromkeys(name for _, names, _ in curves for name in names[1:]))
    rows = [["stage", "images", *parts]]
    for label, names, curve in curves:
        rows += [[label, row[0], *(dict(zip(names[1:], row[1:])).get(p, "") for p in parts)] for row in curve]
    with atomic_write(Path(folder) / "loss.csv") as tmp:
        tmp.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    if len(curves) == 1:
        label, names, curve = curves[0]
        series = {name: [(row[0], row[k]) for row in curve] for k, name in enumerate(names[1:], 1)}
    else:
        series = {label: [(row[0], row[1]) for row in curve] for label, _, curve in curves}
    marks = {curve[0][0]: "" for _, _, curve in curves[1:] if curve}
    if sum(len(c) for _, _, c in curves) >= 2:
        plot_lines(series, Path(folder) / "loss.png", "training loss (window means)", "images seen", "loss",
                   log_y=True, marks=marks)


def write_json(path, obj):
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


DIST_TIMEOUT = 1800          # seconds one process waits for the others in a collective (FEWSTEP_DIST_TIMEOUT overrides)


def dist_timeout():
    """The collective timeout in seconds: FEWSTEP_DIST_TIMEOUT, else DIST_TIMEOUT. No process waits on another for
    long any more (evaluation and export are split over the ranks; downloads wait on a file lock, not in a
    collective), so 30 min covers a slow checkpoint write, a first torch.compile or a rank started late; without it
    NCCL's watchdog would end the job after its default 10 min."""
    text = os.environ.get("FEWSTEP_DIST_TIMEOUT")
    if text is None:
        return DIST_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"FEWSTEP_DIST_TIMEOUT={text!r}: give the collective timeout in seconds (a positive number)")
    return seconds


class Dist:
    """The process group: works under plain `python` (world 1) and under `torchrun` (gloo on CPU, nccl on CUDA,
    each process on the GPU of its LOCAL_RANK), with an explicit collective timeout (dist_timeout). Only rank 0
    writes files and prints. On CUDA: TF32 for what runs in fp32 (the frozen teacher; bf16 autocast covers the
    trained networks) and cuDNN's autotuner; prepare() applies --channels-last and --compile to a network."""

    def __init__(self, device=None, compile=False, channels_last=False):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = default_device()
        try:                                     # --device tpu: one line, not torch's traceback; meta: FLOP counts
            parsed = torch.device("meta" if str(device) == "meta" else device_name(str(device)))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--device {e}") from None
        check_available(parsed)
        if parsed.type == "cuda":
            if parsed.index is not None and self.world > 1:
                raise UserError(f"--device {device} with {self.world} processes would put them all on one GPU: pass "
                                "--device cuda (or nothing); each process takes the GPU of its LOCAL_RANK")
            parsed = torch.device("cuda", local if parsed.index is None else parsed.index)
            if parsed.index >= torch.cuda.device_count():
                raise UserError(f"{parsed} (LOCAL_RANK {local}) does not exist: {torch.cuda.device_count()} GPU(s) visible")
        self.device = parsed
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True         # fixed shapes: cuDNN times its algorithms once per shape
        self.timeout = dist_timeout()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=self.timeout))
        self.comm = self.device if self.device.type == "cuda" else torch.device("cpu")    # where NCCL/gloo tensors live
        self.main = self.rank == 0
        self.compile, self.channels_last = compile, channels_last
        if self.device.type == "cuda":
            self.log(f"{self.world} process(es), {torch.cuda.get_device_name(self.device)}: bf16 autocast for the trained "
                     "networks, the frozen teacher in fp32 with TF32 matmuls and convolutions, cudnn.benchmark"
                     f"{', torch.compile' * compile}{', channels_last' * channels_last}; collective timeout {self.timeout:g} s")

    def batch(self, global_batch):
        """This process's share of the global batch."""
        if global_batch % self.world:
            raise UserError(f"batch size {global_batch} is not divisible by the {self.world} processes")
        return global_batch // self.world

    def prepare(self, module):
        """module with --channels-last and --compile applied, in place and once (its state_dict keeps its names)."""
        if isinstance(module, nn.Module) and not getattr(module, "_fewstep_prepared", False):
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.compile:
                module.compile()
            module._fewstep_prepared = True
        return module

    def grad_sync(self, params):
        """The gradient averaging of one backward pass (GradSync; call its wait() before clipping), None for one process."""
        return GradSync(params, self.world) if self.world > 1 else None

    def broadcast(self, module):
        """Start every process from rank 0's weights."""
        if self.world > 1:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def check_in_sync(self, module):
        """Raise if the processes' weights differ (they must after every synchronised step)."""
        if self.world == 1:
            return True
        vec = torch.cat([p.detach().flatten().double() for p in module.parameters()]).to(self.device)
        ref = vec.clone()
        dist.broadcast(ref, 0)
        diff = (vec - ref).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if diff.item() != 0:
            raise RuntimeError(f"processes out of sync: max weight difference {diff.item():.3g}")
        return True

    def gather_state(self, state):
        """Every process's RNG state (a uint8 tensor), as a list indexed by rank."""
        if self.world == 1:
            return [state]
        states = [torch.empty_like(state) for _ in range(self.world)]
        dist.all_gather_object(states, state)
        return states

    def restore_state(self, gen, states):
        """Resume gen from a gather_state list (a run resumed with fewer processes takes rank 0's)."""
        gen.set_state(states[self.rank] if self.rank < len(states) else states[0])

    # --- the evaluation's collectives: work split over the ranks, results on every rank, decisions by rank 0 ---

    def share(self, items):
        """This process's share of a list of work items (batches): items rank, rank + world, ... (round robin, so
        the item boundaries, and with them every result, are those of one process)."""
        return items[self.rank::self.world]

    def gather_shares(self, mine, sizes):
        """Item j's result (a tensor of sizes[j] rows, made by rank j % world) for every j, concatenated in item
        order, on every rank. mine: this rank's results in share() order. World 1: mine concatenated."""
        if self.world == 1:
            return torch.cat(mine)
        tail, dtype = mine[0].shape[1:] if mine else None, mine[0].dtype if mine else None
        meta = [None] * self.world
        dist.all_gather_object(meta, (tuple(tail), dtype) if mine else None)
        tail, dtype = next(m for m in meta if m is not None)
        rows = [sum(sizes[r::self.world]) for r in range(self.world)]
        local = torch.zeros((max(rows), *tail), dtype=dtype, device=self.comm)
        if mine:
            local[:rows[self.rank]] = torch.cat(mine).to(self.comm)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        offsets, out = [0] * self.world, []
        for j, size in enumerate(sizes):
            r = j % self.world
            out.append(parts[r][offsets[r]:offsets[r] + size])
            offsets[r] += size
        return torch.cat(out).cpu()

    def sum(self, tensor):
        """tensor summed over the processes (float64 statistics: each rank's partial sums)."""
        if self.world == 1:
            return tensor
        t = tensor.to(self.comm)
        dist.all_reduce(t)
        return t.to(tensor.device)

    def all_gather_object(self, obj):
        """[every rank's obj], indexed by rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's obj on every rank: what rank 0 decided or read from its files (the others follow it)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]

    def decide(self, fn):
        """fn() run by rank 0 alone (what it reads are rank 0's files), its result, or the UserError it raised, on
        every rank: a decision all ranks follow, so none of them waits in a collective the others skip."""
        if self.world == 1:
            return fn()
        result = None
        if self.main:
            try:
                result = ("value", fn())
            except UserError as e:
                result = ("error", str(e))
        kind, value = self.from_main(result)
        if kind == "error":
            raise UserError(value)
        return value

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def log(self, *args):
        if self.main:
            tqdm.write(" ".join(str(a) for a in args))


class GradSync:
    """Gradient averaging over the processes, overlapped with backward (what DistributedDataParallel does, written
    out so that SFD's step after every student step and SFERD's freezing mid-run need nothing special). The
    parameters that require a gradient now, in reverse order (backward reaches the last layers first), are cut into
    buckets of about BUCKET_BYTES; a hook after each parameter's gradient is accumulated launches its bucket's
    all-reduce once the bucket is complete, buckets strictly in order (every rank must issue its collectives in the
    same order); wait() launches what backward left (parameters without a gradient this time), waits and averages."""
    BUCKET_BYTES = 25 * 2**20              # DistributedDataParallel's default bucket_cap_mb

    def __init__(self, params, world):
        self.world, self.works, self.launched = world, [], 0
        order = [p for p in reversed(list(params)) if p.requires_grad]
        self.buckets, size = [], 0
        for p in order:
            full = size + p.numel() * p.element_size() > self.BUCKET_BYTES
            if not self.buckets or full or self.buckets[-1][-1].dtype != p.dtype:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.missing = [len(b) for b in self.buckets]
        self.hooks = [p.register_post_accumulate_grad_hook(self.ready) for p in order]

    def ready(self, p):
        self.missing[self.bucket_of[id(p)]] -= 1
        while self.launched < len(self.buckets) and self.missing[self.launched] == 0:
            self.launch()

    def launch(self):
        grads = [p.grad for p in self.buckets[self.launched] if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) if grads else None
        self.works.append((dist.all_reduce(flat, async_op=True) if grads else None, flat, grads))
        self.launched += 1

    def wait(self):
        while self.launched < len(self.buckets):
            self.launch()
        for hook in self.hooks:
            hook.remove()
        for work, flat, grads in self.works:
            if work is not None:
                work.wait()
                flat /= self.world
                for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(part.view_as(g))


def autocast(device, enabled=None):
    """bf16 autocast of the trained networks: on by default on CUDA, off on CPU (enabled=True turns it on there
    too, through this same context: the tests' way to see what CUDA runs). cache_enabled=False: casts of the
    weights cached while a region runs under no_grad (a target network, a teacher) could be reused with grad
    later in the same region, and silently give those weights no gradient (pytorch#112583, fixed in torch 2.2 by
    pytorch#113685; requirements.txt allows older releases' relatives). The frozen teacher leaves it (full_precision)."""
    device = torch.device(device)
    on = device.type == "cuda" if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if on else nullcontext()


def no_autocast(x):
    """Full precision for what runs inside, on x's device (attention logits, the frozen teacher); a no-op where
    there is no autocast to leave (CPU outside it, the meta device)."""
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()


def full_precision(fn):
    """fn (a frozen teacher's call, e.g. sferd.py's guided teacher) run in fp32 whatever autocast surrounds it:
    the teacher's roll-out in training and its evaluation share one precision. Keeps fn's name (functools.wraps)."""
    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        with no_autocast(x):
            return fn(x.float(), *args, **kwargs)
    return call


# ----------------------------------------------------------------------------------------------
# 11. The training loop's machinery: reading the losses (settle), stop signals, a run's checkpoint
# ----------------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM (what a scheduler or `kill` sends) and SIGINT (Ctrl-C) while a training loop runs: the first asks
    the loop to stop after its current update (train_loop writes a checkpoint, prints the --resume command and
    exits non-zero); the same signal again exits at once. Outside training the usual handlers apply."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():     # handlers can only be set there
            self.old = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if signum == self.signum:                 # the same signal twice: at once, as if no handler were set
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}


def resume_command(world=1):
    """The command line of this run with --resume: what to type to continue it."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]]
    head = ["python"] if world == 1 else ["torchrun", f"--nproc_per_node={world}"]
    return " ".join(head + argv + ([] if "--resume" in argv else ["--resume"]))


def check_settings(ck, path, settings):
    """--resume: refuse a checkpoint of another teacher, of no recorded teacher, or of other settings
    (settings: what the weights depend on; saved in every checkpoint of the run)."""
    old = ck.get("settings")
    if old is None or "step" not in ck:
        raise UserError(f"{path} was written by an older fewstep (another checkpoint layout); use another --out, "
                        "or drop --resume to start over")
    if "teacher_sha256" in settings:
        check_same_teacher(old, path, settings["teacher_sha256"])
    changed = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in settings.items()
               if k != "teacher_sha256" and old.get(k) != v]
    if changed:
        raise UserError(f"{path} was trained with other settings: {', '.join(changed)}; use another --out or drop --resume")


SETTLE_EVERY = 50            # steps at most between two reads of the losses (the non-finite check of every rank)


def settle(pg, s, pending, window, total, signum=None):
    """Read the losses of the steps since the last read at once (one host sync) and book them as each step would
    have: loss_start, the running loss_avg, the window sums and, at a window's end, a loss.csv row (the same
    arithmetic on the same numbers as one read per step). Every rank learns whether any rank's loss was not finite
    (one small all-reduce), so all of them stop together with rank 0's line naming the rank that saw it.
    The same all-reduce tells every rank whether any rank received SIGTERM/SIGINT (signum: this rank's), so that they
    stop together. pending: [(step, images, done, losses, parts)], emptied. Returns (the last step's {name: value},
    the signal number to stop at, or 0)."""
    if not pending:
        return {}, signum or 0
    flat = torch.stack([v.detach().double().reshape(()) for *_, values, parts in pending
                        for v in [*values, *parts.values()]]).tolist()
    bad, shown, i = None, {}, 0                                  # bad: (step, value) of the first non-finite loss
    for step, images, done, values, parts in pending:
        losses, named = flat[i:i + len(values)], flat[i + len(values):i + len(values) + len(parts)]
        i += len(values) + len(parts)
        if bad is None:
            bad = next(((step, v) for v in losses if not math.isfinite(v)), None)
        value = sum(losses) / max(len(losses), 1)
        s["loss_start"] = value if s["loss_start"] is None else s["loss_start"]
        s["loss_avg"] = value if s["loss_avg"] is None else 0.95 * s["loss_avg"] + 0.05 * value
        shown = {"loss": value, **dict(zip(parts, named))}
        for name, v in shown.items():
            s["acc"][name] = s["acc"].get(name, 0.0) + v
        if step % window == 0 or done >= total:                 # one loss.csv row per window
            n = (step - 1) % window + 1
            s["curve"].append([images] + [v / n for v in s["acc"].values()])
            s["curve_names"] = ["images", *s["acc"]]
            s["acc"] = {}
    pending.clear()
    codes = torch.zeros(pg.world, 3, dtype=torch.float64)         # per rank: its first bad loss's step and kind, its signal
    if bad is not None:
        codes[pg.rank, :2] = torch.tensor([bad[0], 1.0 if math.isnan(bad[1]) else math.copysign(2.0, bad[1])])
    codes[pg.rank, 2] = signum or 0
    codes = pg.sum(codes).tolist()
    seen = [(step, r, kind) for r, (step, kind, _) in enumerate(codes) if kind]
    if seen:                                                     # the rank that saw it first (the others' follows)
        _, rank, kind = min(seen)
        value = {1.0: "nan", 2.0: "inf", -2.0: "-inf"}[kind]
        where = f" on rank {rank} of {pg.world}" if pg.world > 1 else ""
        raise UserError(f"loss is {value} (not finite){where}: lower the learning rate or check the data; "
                        "the last checkpoint is kept")
    return shown, int(max(code[2] for code in codes))


def restore(pg, opt, run, s, budget):
    """Continue from run.resume (checked against run.settings): the nets, the optimizer, the counters s, the generators."""
    ck = run.resume
    check_settings(ck, run.path, run.settings)
    for name, module in run.nets.items():
        load_state(module, ck[name], run.path)
    opt.load_state_dict(ck["opt"])
    s.update({k: ck.get(k, s[k]) for k in s})                  # (curve_names: absent in older checkpoints)
    pg.restore_state(run.gen, ck["rng"])
    for name, g in run.shared_rngs.items():
        g.set_state(ck[name])
    pg.log(f"resuming {run.desc} at {s['done']:,} of {budget.total:,} {budget.unit}")


def save_run(pg, opt, run, s, finished):
    """The run's checkpoint at run.path (rank 0 writes it; every rank's generator state is gathered into it)."""
    rng = pg.gather_state(run.gen.get_state())
    if pg.main:
        save_checkpoint(run.path, run.kind, **{k: m.state_dict() for k, m in run.nets.items()}, opt=opt.state_dict(),
                        rng=rng, **{k: g.get_state() for k, g in run.shared_rngs.items()}, **s, finished=finished,
                        settings=run.settings)


# ----------------------------------------------------------------------------------------------
# 12. Loading the teacher a method distils
# ----------------------------------------------------------------------------------------------


def load_teacher(ev, pg=None):
    """The frozen teacher Denoiser of ev (Eval): --teacher SPEC (load_denoiser: teacher.pt, EDM .pkl, diffusers folder,
    edm, ddpm); with --dataset cifar10 --preset paper EDM's published checkpoint, as the papers; else the
    cached shared teacher of the preset, trained first (with a time estimate) if missing.
    Returns (denoiser, path of its file or folder)."""
    spec = ev.teacher or ("edm" if ev.dataset == "cifar10" and ev.preset == "paper" else None)
    if spec is None:
        spec = teacher_dir(ev.dataset, ev.preset) / "teacher.pt"
        if not spec.exists():
            data, _ = load_dataset(ev.dataset, ev.data_dir)         # a missing dataset: one line, before any announcement
            prepare_out_dir(spec.parent)
            with folder_lock(spec.parent, wait=f"its teacher.pt (another run is training the {ev.preset} teacher)"):
                if not spec.exists():                               # not trained meanwhile by the run waited for
                    est = TEACHER_PRESETS[ev.preset]["minutes"]
                    if int(os.environ.get("RANK", 0)) == 0:
                        print(f"no cached {ev.preset} teacher for {ev.dataset} at {spec}: training it now (about "
                              f"{est:g} min on a 2-core CPU for lab; once per dataset and preset)", file=sys.stderr)
                    train_teacher(ev.dataset, ev.preset, data_dir=ev.data_dir, device=ev.device,
                                  resume=(spec.parent / "checkpoint.pt").exists(), data=data)
    D = load_denoiser(spec, pg.device if pg else (ev.device or "cpu"))
    check_teacher_compatible(D.source, getattr(D, "dataset", None), ev.dataset)
    if pg is not None:
        pg.prepare(D.net)                        # --channels-last, --compile
    return D, Path(D.source)


def load_inputs(ev, pg, seed, archs=None, need=""):
    """A method's inputs, checked before any training: the training images of ev.dataset, the global seed (before the
    teacher: building its network draws from the global RNG, and what is initialised after it, e.g. cfd.py's
    classifier and sferd.py's E_phi and G_tau, draws next), the teacher (load_teacher), and its architecture
    where the method needs its U-Net (require_arch: archs, need). Returns (data, D, path)."""
    data, _ = load_dataset(ev.dataset, ev.data_dir)
    seed_all(seed)
    D, path = load_teacher(ev, pg)
    if archs:
        require_arch(D.net, archs, need)
    check_data_shape(data, D, ev.dataset)
    return data, D, path


def check_teacher_compatible(path, teacher_dataset, dataset):
    """A teacher must denoise this run's images: the same dataset, when its file records one (the image
    shape is checked against the data by check_data_shape)."""
    dataset_shape(dataset)                                   # an unknown --dataset: one line
    if teacher_dataset and teacher_dataset != dataset and not (teacher_dataset + dataset).count("folder:") == 2:
        raise UserError(f"{path} is a {teacher_dataset} teacher, but --dataset is {dataset}: pass a {dataset} teacher "
                        "or drop --teacher")


# ----------------------------------------------------------------------------------------------
# 13. Published teachers: EDM's CIFAR-10 SongUNet and DDPM's U-Net in diffusers' layout, read
#     without their authors' code (--teacher edm | ddpm | PATH)
# ----------------------------------------------------------------------------------------------

PUBLISHED = {   # name -> (canonical URL folder, files, where they land under DOWNLOAD_DIR)
    # Karras et al. 2022 (NVlabs/edm), CC BY-NC-SA 4.0: EDMPrecond(SongUNet), DDPM++ settings, FID 1.97 at 35 NFE.
    "edm": ("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/", ["edm-cifar10-32x32-uncond-vp.pkl"],
            "edm-cifar10-32x32-uncond-vp.pkl"),
    # Ho et al. 2020 as converted by diffusers (google/ddpm-cifar10-32), Apache-2.0: eps-prediction, 1000 steps.
    "ddpm": ("https://huggingface.co/google/ddpm-cifar10-32/resolve/main/",
             ["config.json", "scheduler_config.json", "diffusion_pytorch_model.bin"], "ddpm-cifar10-32"),
}
PUBLISHED_PARAMS = {"edm": 55_733_891}   # the content check of a one-file download (tests/test_teachers.py: the real layout)
ARCHS = {"fewstep": "fewstep's compact U-Net", "edm-songunet": "EDM's SongUNet", "ddpm-diffusers": "DDPM's eps U-Net"}


def net_arch(net):
    """'fewstep' | 'edm-songunet' | 'ddpm-diffusers' (checkpoints older than this key are fewstep's)."""
    return net.config.get("arch", "fewstep")


def require_arch(net, archs, need):
    """One line when a method needs what only some architectures have (attention maps, features, ...)."""
    if net_arch(net) not in archs:
        raise UserError(f"{need}, which {ARCHS[net_arch(net)]} does not have; use a teacher of "
                        f"{' or '.join(ARCHS[a] for a in archs)}")


def image_shape(net):
    """(C, H, W) of the images a network makes, from its config."""
    c, arch = net.config, net_arch(net)
    if arch == "edm-songunet":
        return (c["in_channels"], c["img_resolution"], c["img_resolution"])
    if arch == "ddpm-diffusers":
        return (c["unet"]["in_channels"], c["unet"]["sample_size"], c["unet"]["sample_size"])
    return (c["in_ch"], c["res"], c["res"])


def check_data_shape(data, D, dataset):
    """Refuse a teacher whose images do not have the data's shape (before any training)."""
    if tuple(data.shape[1:]) != tuple(image_shape(D.net)):
        raise UserError(f"the teacher makes {'x'.join(map(str, image_shape(D.net)))} images but {dataset} has "
                        f"{'x'.join(map(str, data.shape[1:]))}: pass a teacher of this dataset with --teacher")


# --- EDM's SongUNet (NVlabs/edm training/networks.py), DDPM++ settings, EDM's parameter names ---

def edm_group_norm(ch):
    """EDM's GroupNorm: min(32, C/4) groups, eps 1e-6 as SongUNet sets it."""
    return nn.GroupNorm(min(32, ch // 4), ch, eps=1e-6)


class EDMConv2d(nn.Conv2d):
    """EDM's Conv2d: optional 2x up/down-sampling with the separable resample filter f f^T/(sum f)^2,
    then the convolution (fused: convolution first, then the strided filter; NCSN++'s residual encoder).
    The filter is a buffer (in the snapshot's state) only where it is used."""

    def __init__(self, cin, cout, kernel, up=False, down=False, resample_filter=(1, 1), fused_resample=False):
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        self.up, self.down, self.fused_resample = up, down, fused_resample
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (f.ger(f) / f.sum().square())[None, None] if up or down else None)

    def forward(self, x):
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.fused_resample and self.down:
                x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2 + pad)
                x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
                return x + self.bias.reshape(1, -1, 1, 1)
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                       padding=pad)
            else:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=pad)
        return super().forward(x)


class EDMBlock(nn.Module):
    """EDM's UNetBlock as SongUNet configures it: additive embedding (adaptive_scale False),
    skip_scale sqrt(1/2) after the residual and after the attention, one head, 1x1 resample_proj skip."""

    def __init__(self, cin, cout, emb_ch, up=False, down=False, attention=False, dropout=0.0, resample_filter=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.skip_scale, self.num_heads = cin, cout, math.sqrt(0.5), int(attention)
        self.norm0 = edm_group_norm(cin)
        self.conv0 = EDMConv2d(cin, cout, 3, up, down, resample_filter)
        self.affine = nn.Linear(emb_ch, cout)
        self.norm1 = edm_group_norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv1 = EDMConv2d(cout, cout, 3)
        self.skip = EDMConv2d(cin, cout, 1, up, down, resample_filter) if cout != cin or up or down else None
        if attention:
            self.norm2, self.qkv, self.proj = edm_group_norm(cout), EDMConv2d(cout, 3 * cout, 1), EDMConv2d(cout, cout, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(self.drop(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            # qkv is laid out per head as (C/heads, 3) in EDM: reshape, not chunk.
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            with no_autocast(x):                          # EDM's AttentionOp: fp32, which autocast would undo
                w = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(k.shape[1])).float()).softmax(dim=2).to(q.dtype)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """F(x, c_noise) of EDM's SongUNet (Song et al. 2021's DDPM++ and NCSN++ as EDM writes them), built
    from the snapshot's _init_kwargs: positional (DDPM++) or Fourier (NCSN++) embedding, sin/cos swapped;
    standard or residual (NCSN++) encoder; standard decoder. Unconditional only; no attention maps,
    features or extra condition (fewstep extras)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1), sigma_data=SIGMA_DATA):
        super().__init__()
        if encoder_type not in ("standard", "residual") or decoder_type != "standard" or label_dim:
            raise UserError(f"EDM SongUNet with encoder {encoder_type}, decoder {decoder_type}, label_dim {label_dim}: "
                            "fewstep reads the unconditional DDPM++ and NCSN++ settings of EDM's checkpoints")
        self.config = dict(arch="edm-songunet", img_resolution=img_resolution, in_channels=in_channels,
                           out_channels=out_channels, augment_dim=augment_dim, model_channels=model_channels,
                           channel_mult=list(channel_mult), channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, channel_mult_noise=channel_mult_noise,
                           resample_filter=list(resample_filter), embedding_type=embedding_type,
                           encoder_type=encoder_type, sigma_data=sigma_data)
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        self.noise_ch = noise_ch
        block = lambda cin, cout, **kw: EDMBlock(cin, cout, emb_ch, dropout=dropout, resample_filter=resample_filter, **kw)
        if embedding_type == "fourier":              # FourierEmbedding: random frequencies, a buffer of the snapshot
            self.map_noise = nn.Module()
            self.map_noise.register_buffer("freqs", torch.randn(noise_ch // 2) * 16)
        self.fourier = embedding_type == "fourier"
        self.map_augment = nn.Linear(augment_dim, noise_ch, bias=False) if augment_dim else None   # unused at inference
        self.map_layer0, self.map_layer1 = nn.Linear(noise_ch, emb_ch), nn.Linear(emb_ch, emb_ch)
        self.enc, cout, caux = nn.ModuleDict(), in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"], cout = EDMConv2d(cout, model_channels, 3), model_channels
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = EDMConv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                                      fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(cout, model_channels * mult, attention=res in attn_resolutions)
                cout = model_channels * mult
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = block(cout + skips.pop(), model_channels * mult,
                                                            attention=idx == num_blocks and res in attn_resolutions)
                cout = model_channels * mult
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = edm_group_norm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = EDMConv2d(cout, out_channels, 3)

    def forward(self, x, c_noise, cond=None, **extras):
        if cond is not None or extras:
            raise UserError("EDM's SongUNet takes no extra condition and gives no attention maps or features")
        # PositionalEmbedding(endpoint=True): frequencies (1/10000)^(i/(n/2 - 1)); FourierEmbedding: 2 pi freqs.
        if self.fourier:
            freqs = 2 * math.pi * self.map_noise.freqs.float()
        else:
            half = self.noise_ch // 2
            freqs = (1 / 10_000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
        emb = c_noise.float().ger(freqs)
        emb = torch.cat([emb.sin(), emb.cos()], dim=1)      # EDM's [cos, sin], swapped by SongUNet
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, block in self.enc.items():
            if name.endswith("aux_residual"):             # NCSN++: the input's own downsampled path
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, EDMBlock) else block(x)
                skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                x = block(x)
            elif name.endswith("aux_conv"):
                x = block(F.silu(x))
            else:
                if x.shape[1] != block.in_channels:       # EDM's rule: concatenate a skip where the widths differ
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x


# --- DDPM's CIFAR-10 U-Net in diffusers' UNet2DModel layout (Ho et al. 2020), diffusers' names ---

class DDPMResnet(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm 'default'): the embedding is added after conv1."""

    def __init__(self, cin, cout, emb_ch, groups, eps, dropout, output_scale_factor=1.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_ch, cout)
        self.norm2, self.dropout = nn.GroupNorm(groups, cout, eps), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return ((self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h) / self.output_scale_factor


class DDPMAttention(nn.Module):
    """diffusers' Attention as converted from DDPM's attention block: GroupNorm, q/k/v/out linear maps
    over the H*W positions, softmax(q k^T/sqrt(d)), residual, / rescale_output_factor."""

    def __init__(self, ch, heads, groups, eps, rescale=1.0):
        super().__init__()
        self.heads, self.rescale = heads, rescale
        self.group_norm = nn.GroupNorm(groups, ch, eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)
        q, k, v = (f(h).reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return (self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W) + x) / self.rescale


class DDPMSample(nn.Module):
    """Downsample2D (3x3 stride-2 conv; padding 0 pads right/bottom by one, as DDPM's TF code) or
    Upsample2D (nearest 2x, then a 3x3 conv)."""

    def __init__(self, ch, down, padding=1):
        super().__init__()
        self.down, self.padding = down, padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=padding if down else 1)

    def forward(self, x):
        if not self.down:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class DDPMLevel(nn.Module):
    """A diffusers Down/Up block: resnets (each followed by attention in the Attn* blocks), then a resampler."""

    def __init__(self, resnets, attentions, sampler, up):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.up, self.samplers = up, "upsamplers" if up else "downsamplers"
        setattr(self, self.samplers, nn.ModuleList([sampler]) if sampler else None)

    def forward(self, x, emb, skips):
        outs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1) if self.up else x, emb)
            x = self.attentions[i](x) if self.attentions is not None else x
            outs.append(x)
        if getattr(self, self.samplers) is not None:
            x = getattr(self, self.samplers)[0](x)
            outs.append(x)
        return x, outs


DDPM_UNET_DEFAULTS = dict(   # diffusers' UNet2DModel defaults, for keys a config.json leaves out
    in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional", freq_shift=0,
    flip_sin_to_cos=True, down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], block_out_channels=[224, 448, 672, 896],
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv", upsample_type="conv",
    dropout=0.0, act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None, num_class_embeds=None,
    mid_block_type="UNetMidBlock2D", time_embedding_dim=None)
DDPM_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                               trained_betas=None, prediction_type="epsilon")


class DDPMUNet(nn.Module):
    """eps(z_t, t) of diffusers' UNet2DModel with DDPM's settings, and the discrete sigma table of its
    scheduler, so Denoiser can use it as D(x, sigma) = x - sigma*eps(x/sqrt(1 + sigma^2), t(sigma))."""

    def __init__(self, unet, scheduler):
        super().__init__()
        u, s = {**DDPM_UNET_DEFAULTS, **unet}, {**DDPM_SCHEDULER_DEFAULTS, **scheduler}
        u = {k: u[k] for k in [*DDPM_UNET_DEFAULTS, "sample_size"] if k in u}
        s = {k: s[k] for k in DDPM_SCHEDULER_DEFAULTS}
        unsupported = {k: u[k] for k, ok in [
            ("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"), ("act_fn", "silu"),
            ("class_embed_type", None), ("num_class_embeds", None), ("downsample_type", "conv"), ("upsample_type", "conv"),
            ("mid_block_type", "UNetMidBlock2D"), ("time_embedding_dim", None)] if u[k] != ok}
        blocks = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"}
        if unsupported or not set(u["down_block_types"] + u["up_block_types"]) <= blocks or not u.get("sample_size"):
            raise UserError(f"diffusers UNet2DModel settings not supported here: {unsupported or 'block types or sample_size'} "
                            f"(fewstep reads DDPM's CIFAR-10 layout)")
        if s["prediction_type"] != "epsilon" or s["beta_schedule"] not in ("linear", "scaled_linear"):
            raise UserError(f"scheduler with prediction_type {s['prediction_type']}, beta_schedule {s['beta_schedule']}: "
                            "fewstep reads eps-prediction DDPMs with linear or scaled_linear betas")
        self.config = dict(arch="ddpm-diffusers", unet=u, scheduler=s)
        ch, groups, eps, drop = u["block_out_channels"], u["norm_num_groups"], u["norm_eps"], u["dropout"]
        emb_ch, n = 4 * ch[0], u["layers_per_block"]
        heads = lambda c: 1 if u["attention_head_dim"] is None else c // u["attention_head_dim"]
        attn = lambda c, g=groups, rescale=1.0: DDPMAttention(c, heads(c), g, eps, rescale)
        self.conv_in = nn.Conv2d(u["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1, self.time_embedding.linear_2 = nn.Linear(ch[0], emb_ch), nn.Linear(emb_ch, emb_ch)
        self.down_blocks, cout = nn.ModuleList(), ch[0]
        for i, kind in enumerate(u["down_block_types"]):
            cin, cout, last = cout, ch[i], i == len(ch) - 1
            self.down_blocks.append(DDPMLevel([DDPMResnet(cin if j == 0 else cout, cout, emb_ch, groups, eps, drop)
                                               for j in range(n)],
                                              [attn(cout) for _ in range(n)] if kind.startswith("Attn") else None,
                                              None if last else DDPMSample(cout, True, u["downsample_padding"]), up=False))
        scale = u["mid_block_scale_factor"]
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([DDPMResnet(ch[-1], ch[-1], emb_ch, groups, eps, drop, scale) for _ in range(2)])
        self.mid_block.attentions = nn.ModuleList([attn(ch[-1], u["attn_norm_num_groups"] or groups, scale)]
                                                  if u["add_attention"] else [])
        rev, self.up_blocks = list(reversed(ch)), nn.ModuleList()
        for i, kind in enumerate(u["up_block_types"]):
            prev, cout, cskip = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(DDPMLevel(
                [DDPMResnet((prev if j == 0 else cout) + (cskip if j == n else cout), cout, emb_ch, groups, eps, drop)
                 for j in range(n + 1)],
                [attn(cout) for _ in range(n + 1)] if kind.startswith("Attn") else None,
                None if i == len(ch) - 1 else DDPMSample(cout, False), up=True))
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps)
        self.conv_out = nn.Conv2d(ch[0], u["out_channels"], 3, padding=1)
        # The scheduler's discrete table sigma_t = sqrt((1 - abar_t)/abar_t), t = 0..T-1 (float64).
        T = s["num_train_timesteps"]
        if s["trained_betas"] is not None:
            betas = torch.tensor(s["trained_betas"], dtype=torch.float64)
        elif s["beta_schedule"] == "linear":
            betas = torch.linspace(s["beta_start"], s["beta_end"], T, dtype=torch.float64)
        else:
            betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, T, dtype=torch.float64) ** 2
        self.register_buffer("log_sigmas", sigma_from_alpha_bar(torch.cumprod(1 - betas, 0)).log(), persistent=False)

    def t_from_sigma(self, sigma):
        """t(sigma): linear in ln(sigma) between the table's integer steps (k-diffusion's DiscreteSchedule),
        clamped to [0, T-1] outside the table."""
        ls = self.log_sigmas
        log_sigma = sigma.to(ls).log().clamp(ls[0], ls[-1])
        i = torch.searchsorted(ls, log_sigma).clamp(1, len(ls) - 1)
        w = (log_sigma - ls[i - 1]) / (ls[i] - ls[i - 1])
        return (i - 1 + w).float()

    def forward(self, z, t, cond=None, **extras):
        if cond is not None or extras:
            raise UserError("DDPM's U-Net takes no extra condition and gives no attention maps or features")
        u = self.config["unet"]
        if u["center_input_sample"]:
            z = 2 * z - 1
        # diffusers' get_timestep_embedding: exp(-ln(10^4) i/(n/2 - freq_shift)), [sin, cos] (flipped if asked).
        half = u["block_out_channels"][0] // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=z.device) / (half - u["freq_shift"]))
        emb = t.float().reshape(-1, 1).expand(len(z), 1) * freqs[None]
        emb = torch.cat([emb.cos(), emb.sin()] if u["flip_sin_to_cos"] else [emb.sin(), emb.cos()], dim=1)
        emb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb.to(z.dtype))))
        h = self.conv_in(z)
        skips = [h]
        for block in self.down_blocks:
            h, outs = block(h, emb, None)
            skips += outs
        h = self.mid_block.resnets[0](h, emb)
        if self.mid_block.attentions:
            h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, emb)
        for block in self.up_blocks:
            h, _ = block(h, emb, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# --- Readers: an EDM snapshot pickle (no code runs), a diffusers folder, the published names ---

class _Persistent:
    """Stand-in for an object of EDM's torch_utils.persistence: its class name and state only; the
    embedded module source is never executed."""

    def __init__(self, meta=None):
        meta = meta or {}
        self.class_name, self.state = meta.get("class_name"), meta.get("state", {})

    def __setstate__(self, state):          # torch.nn.ModuleDict, pickled by value: keep its __dict__
        self.class_name, self.state = "ModuleDict", state


class _EasyDict(dict):
    """dnnlib.util.EasyDict: a dict (what dataset_kwargs and the like may be)."""


def _np_scalar(dtype, data=None):
    if dtype.hasobject:
        raise UserError("the snapshot holds a numpy object scalar: refused (it could name any Python object)")
    return _NUMPY_CORE.multiarray.scalar(dtype, data)


def _storage_from_bytes(b):
    """torch's Storage.__reduce__ writes each storage as a small torch.save file: read it weights-only."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


EDM_SNAPSHOT = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,   # EDM's networks: class name and state
    ("torch.nn.modules.container", "ModuleDict"): _Persistent,                  # pickled by value inside them
    ("dnnlib.util", "EasyDict"): _EasyDict,                                     # dataset_kwargs and the like
    ("collections", "OrderedDict"): collections.OrderedDict,                   # parameter and buffer dicts
    ("builtins", "set"): set,                           # protocols < 4 spell empty sets this way
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,    # the weights ...
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,                 # ... and their storages, weights-only
    **{(f"numpy.{core}.multiarray", "scalar"): _np_scalar for core in ("core", "_core")},   # numbers in the kwargs
    ("numpy", "dtype"): np.dtype,
}


def _edm_state_dict(obj, prefix=""):
    """Parameters and persistent buffers of a tree of stand-ins, as state_dict() would name them."""
    state, out = obj.state, {}
    skip = state.get("_non_persistent_buffers_set", set())
    for kind in ("_parameters", "_buffers"):
        for k, v in state.get(kind, {}).items():
            if v is not None and k not in skip:
                out[prefix + k] = v.detach() if torch.is_tensor(v) else v
    for k, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(_edm_state_dict(child, f"{prefix}{k}."))
    return out


def _plain(v):
    """numpy scalars and tuples in stored kwargs -> Python numbers and lists (checkpoint-safe)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def read_edm_snapshot(path):
    """EDMPrecond(SongUNet) of an EDM snapshot (dict(ema, loss_fn, augment_pipe, dataset_kwargs) or a
    bare network), read by AllowlistUnpickler with EDM_SNAPSHOT; returns a SongUNet with its weights and sigma_data."""
    try:
        with open(path, "rb") as f:
            data = AllowlistUnpickler(f, EDM_SNAPSHOT, "an EDM snapshot").load()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:        # truncated or not a pickle: many exception types, one meaning
        raise UserError(f"{path}: truncated or not an EDM snapshot ({e.__class__.__name__}: {e})"[:300]) from None
    precond = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(precond, _Persistent) or not isinstance(precond.state, dict):
        raise UserError(f"{path}: no EDM network in this pickle (expected a snapshot dict with 'ema')")
    if precond.class_name != "EDMPrecond":
        raise UserError(f"{path}: the network is a {precond.class_name}; fewstep reads EDMPrecond snapshots "
                        "(c_noise = ln(sigma)/4), such as edm-cifar10-32x32-uncond-vp.pkl")
    kw = {k: _plain(v) for k, v in precond.state.get("_init_kwargs", {}).items()}
    model = precond.state.get("_modules", {}).get("model")
    if kw.get("label_dim", 0):
        raise UserError(f"{path}: a class-conditional network (label_dim {kw['label_dim']}); fewstep's methods "
                        "distil unconditional teachers: use the uncond snapshot")
    if kw.get("model_type", "DhariwalUNet") != "SongUNet" or model is None:
        raise UserError(f"{path}: model_type {kw.get('model_type')}; fewstep reads EDM's SongUNet (DDPM++) snapshots")
    net_kw = {k: _plain(v) for k, v in model.state.get("_init_kwargs", {}).items()}
    try:
        net = SongUNet(**net_kw, sigma_data=float(kw.get("sigma_data", SIGMA_DATA)))
    except TypeError as e:
        raise UserError(f"{path}: unexpected SongUNet settings ({e})") from None
    load_state(net, _edm_state_dict(model), path)
    return net


def read_safetensors(path):
    """A .safetensors file: 8-byte little-endian header length, a JSON header {name: dtype, shape,
    data_offsets}, then the raw little-endian tensors. Plain data, nothing to execute."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body, out = json.loads(raw[8:8 + n]), memoryview(raw)[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype, shape = dtypes[info["dtype"]], info["shape"]
        if not 0 <= start <= end <= len(body) or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
        out[name] = (torch.frombuffer(bytearray(body[start:end]), dtype=dtype).reshape(shape) if end > start
                     else torch.zeros(shape, dtype=dtype))
    return out


LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_diffusers_unet(folder):
    """DDPMUNet of a diffusers UNet2DModel folder: config.json, diffusion_pytorch_model.safetensors (or .bin,
    read weights-only), scheduler_config.json here or in ../scheduler/ (else DDPM's linear 1e-4..0.02, 1000)."""
    folder = Path(folder)
    try:
        unet = json.loads((folder / "config.json").read_text())
        sched_path = next((p for p in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json")
                           if p.is_file()), None)
        scheduler = json.loads(sched_path.read_text()) if sched_path else {}
    except FileNotFoundError:
        raise UserError(f"{folder}: not a diffusers model folder (no config.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: unreadable config.json or scheduler_config.json ({e.__class__.__name__}: {e})") from None
    if not isinstance(unet, dict) or unet.get("_class_name") != "UNet2DModel":
        raise UserError(f"{folder}: config.json describes a {unet.get('_class_name') if isinstance(unet, dict) else '?'}, "
                        "not a UNet2DModel")
    weights = next((folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")
                    if (folder / f"diffusion_pytorch_model.{ext}").is_file()), None)
    if weights is None:
        raise UserError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")
    try:
        state = (read_safetensors(weights) if weights.suffix == ".safetensors"
                 else torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:
        raise UserError(f"{weights}: truncated or unreadable weights ({e.__class__.__name__})") from None
    # Older diffusers files name the attention maps query/key/value/proj_attn.
    rename = lambda k: ".".join(LEGACY_ATTENTION_NAMES.get(p, p) if ".attentions." in k else p for p in k.split("."))
    net = DDPMUNet(unet, scheduler)
    load_state(net, {rename(k): v for k, v in state.items()}, weights)
    return net


def fetch_published(name):
    """The cached copy of a published teacher (PUBLISHED), downloaded once (temp file + rename, one process at a
    time: download). A one-file teacher is first read as its network, which must have PUBLISHED_PARAMS
    parameters: a truncated or foreign file is one line and never cached (no published sha256 exists to check)."""
    url, files, target = PUBLISHED[name]
    path = DOWNLOAD_DIR / target
    folder = path if len(files) > 1 else path.parent
    check = (lambda tmp: check_published(tmp, PUBLISHED_PARAMS[name])) if name in PUBLISHED_PARAMS else None
    for file in files:
        if not (folder / file).exists():
            try:
                download(url + file, folder / file, None, check if len(files) == 1 else None)
            except UserError as e:
                if "unusable" in str(e):
                    raise
                raise UserError(f"teacher {name!r} is not cached in {DOWNLOAD_DIR} and {e}; on a machine without "
                                f"internet, fetch {', '.join(url + f for f in files)} into {folder} yourself") from None
    return path


def check_published(path, params):
    """A downloaded teacher file must read as a network (load_denoiser's readers) of the published size."""
    n = count_params(load_denoiser(path).net)
    if n != params:
        raise UserError(f"{path} holds a network of {n:,} parameters, not the published {params:,}")


def load_denoiser(spec, device="cpu"):
    """The frozen teacher D(x, sigma) (EDM space) of any --teacher spec: a fewstep teacher.pt, an EDM
    snapshot .pkl, a diffusers UNet2DModel folder, or the names 'edm' / 'ddpm' (PUBLISHED, cached).
    D.source names the file or folder it came from."""
    path = fetch_published(spec) if str(spec) in PUBLISHED else Path(spec)
    dataset = None                              # the dataset a fewstep teacher.pt records (the others record none)
    if str(spec) in PUBLISHED:                  # a download that does not read as its format is no use cached
        try:
            return load_denoiser(path, device)
        except UserError as e:
            raise UserError(f"{e} (the cached download; delete {path} to fetch it again)") from None
    if path.is_dir():
        net = read_diffusers_unet(path)
    elif not path.is_file():
        raise UserError(f"--teacher {spec}: no such file or folder (give a teacher.pt, an EDM .pkl, a diffusers "
                        f"folder, or one of {', '.join(PUBLISHED)})")
    else:
        with open(path, "rb") as f:
            magic = f.read(2)
        if path.suffix == ".pkl" or magic[:1] == b"\x80":          # a plain pickle (torch.save files are zips)
            net = read_edm_snapshot(path)
        else:
            ck = load_checkpoint(path, "teacher")
            net = build_net(ck["net_config"])
            load_state(net, ck["ema"], path)
            dataset = ck.get("dataset")
    D = freeze(Denoiser(net).to(device))
    D.source, D.dataset = str(path), dataset
    return D


# ----------------------------------------------------------------------------------------------
# 14. The benchmark of every method's training step (python common.py bench), its FLOPs counted without a GPU
#    (python common.py flops), and the instant refusal of a paper run on a machine without CUDA
# ----------------------------------------------------------------------------------------------

BENCH_METHODS = ("sfd", "pd", "cd", "sfddm", "cfd", "sferd")
# Dense peaks of the vendors' data sheets (A100 SXM, H100 SXM; H200 has H100's compute), FLOP/s: bf16 for what autocast
# runs (the trained networks), TF32 for what stays fp32 on CUDA (the frozen teacher). MFU is measured against them.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TF32_PEAK = {"H100": 495e12, "H200": 495e12, "A100": 156e12}
ASSUMED_MFU = 0.3            # `flops`' projection of GPU hours: an assumption, not a measurement (bench measures it)
CPU_FLOPS = 1e11             # the refusal's assumed CPU rate, 100 GFLOP/s of fp32 training (more than a laptop sustains)


# EDM's CIFAR-10 network (DDPM++ settings of its edm-cifar10-32x32-uncond-vp.pkl), the teacher that the paper
# preset on CIFAR-10 loads (--teacher edm) for the methods that accept it; SFDDM's hidden-map term and SFERD's
# attention maps need fewstep's U-Net, so theirs is DDPM's CIFAR-10 size (NET_CONFIGS['paper']).
EDM_CIFAR10_NET = dict(img_resolution=32, model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                       attn_resolutions=(16,), dropout=0.13, augment_dim=9, channel_mult_noise=1, resample_filter=(1, 1))
BENCH_EDM_NET = ("sfd", "pd", "cd", "cfd")


def bench_teacher(method, preset, in_ch, device):
    """The teacher network the bench times, with random weights, frozen as load_teacher's: at the paper preset EDM's
    SongUNet for the methods in BENCH_EDM_NET, else fewstep's U-Net of the preset. The one place to change what is timed.
    On the meta device (FLOP counting) it is built there, without memory."""
    with torch.device("meta") if str(device) == "meta" else nullcontext():
        if preset == "paper" and method in BENCH_EDM_NET:
            net = SongUNet(in_channels=in_ch, out_channels=in_ch, **EDM_CIFAR10_NET)
        else:
            net = UNet(in_ch=in_ch, res=32, **NET_CONFIGS[preset])
    return freeze(Denoiser(net).to(device))


def method_child(function, name, **options):
    """common.<function>(<name>.bench_step, name, **options) in a process of its own (`python -c`, from this folder):
    the method file is imported there, never by common (imports run common <- fid <- methods), and each method's
    peak memory and compiled graphs are its own. Returns what it returned (JSON)."""
    code = ("import json, sys, common; a = json.loads(sys.argv[1]); "
            f"print(json.dumps(common.{function}(__import__(a['name']).bench_step, **a)))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(dict(name=name, **options))],
                       cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{function} of {name} failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_method(name, device="cpu", **options):
    """One row of the bench table for method `name`, measured by time_bench_step (options: its keywords)."""
    return method_child("time_bench_step", name, device=str(device), **options)


def time_bench_step(bench_step, name, preset="paper", device="cpu", in_ch=3, batch=None, steps=3, warmup=1,
                    channels_last=False, compile=False, count_flops=True):
    """Time `steps` training steps of a method at its preset (random weights, after `warmup` steps), on training's
    code path: Dist's device settings (TF32, cudnn.benchmark), its prepare() (--channels-last, --compile) on every
    network, and each method's bench_step(teacher, preset, device, batch) -> dict(step, unit, per_step, total, nets):
    one full training iteration through common.optimizer_steps under common.autocast, as train_loop runs it, what it
    counts, how many per step and in the preset's whole budget. Returns one row of the bench table."""
    pg = Dist(device, compile=compile, channels_last=channels_last)
    device = pg.device
    seed_all(0)
    teacher = bench_teacher(name, preset, in_ch, device)
    b = bench_step(teacher, preset, device, batch)
    for net in b["nets"]:
        pg.prepare(net)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        b["step"]()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        b["step"]()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    flops = None
    if count_flops and not compile:       # counted on one more step (matmuls and convs, forward and backward)
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            b["step"]()
        flops = counter.get_total_flops()
    throughput = b["per_step"] / seconds
    return dict(method=name, preset=preset, net=ARCHS[net_arch(teacher.net)], params=count_params(teacher.net),
                unit=b["unit"], per_step=b["per_step"], seconds_per_step=seconds,
                throughput=throughput, total=b["total"], projected_hours=b["total"] / throughput / 3600,
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                flops_per_step=flops, achieved_tflops=flops / seconds / 1e12 if flops else None)


def count_step_flops(bench_step, name, preset="paper", in_ch=3):
    """The FLOPs of one training iteration of a method at a preset (bench_step's), counted on the meta device: no
    memory, no arithmetic, no GPU (torch.utils.flop_counter: matmuls and convolutions, forward and backward). Also
    counted apart: the frozen teacher's share (fp32 with TF32 on CUDA, the rest under bf16 autocast)."""
    from torch.utils.flop_counter import FlopCounterMode
    seed_all(0)
    teacher = bench_teacher(name, preset, in_ch, "meta")
    b = bench_step(teacher, preset, torch.device("meta"), None)
    frozen, forward = [0], teacher.forward

    def counted(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:   # a fresh one per call: entering a counter resets it
            out = forward(*args, **kwargs)
        frozen[0] += inner.get_total_flops()
        return out

    teacher.forward = counted
    counter = FlopCounterMode(display=False)
    with counter:
        b["step"]()
    total = counter.get_total_flops()
    return dict(method=name, preset=preset, unit=b["unit"], per_step=b["per_step"], total=b["total"],
                flops_per_unit=total / b["per_step"], teacher_share=frozen[0] / total)


def gpu_hours(row, gpu, mfu=ASSUMED_MFU):
    """Projected hours of a preset's budget on one GPU: the teacher's FLOPs at the TF32 peak, the rest at the bf16
    peak, both times mfu. A projection from counted FLOPs, vendor peaks and an assumed MFU, not a measurement."""
    flops = row["flops_per_unit"] * row["total"]
    return flops * (row["teacher_share"] / TF32_PEAK[gpu] + (1 - row["teacher_share"]) / BF16_PEAK[gpu]) / mfu / 3600


def flops_table(methods, preset, channels, mfu):
    """python common.py flops: every method's counted FLOPs per unit at its preset and the projected A100 / H100 hours."""
    rows = [method_child("count_step_flops", name, preset=preset, in_ch=channels) for name in methods]
    lines = [f"FLOPs per unit counted by torch.utils.flop_counter on the meta device, preset {preset}, torch "
             f"{torch.__version__}, commit {git_commit()}; projected hours = teacher FLOPs / TF32 peak + the rest / bf16 "
             f"peak (dense, vendor data sheets), at an assumed MFU of {mfu:.0%}: a projection, not a measurement", "",
             "| method | unit | GFLOP per unit | of it the frozen teacher | budget | total FLOP | A100 h | H100 h |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['unit']} | {r['flops_per_unit'] / 1e9:,.1f} | {r['teacher_share']:.0%} "
                     f"| {r['total']:,} | {r['flops_per_unit'] * r['total']:.3g} | {gpu_hours(r, 'A100', mfu):,.1f} "
                     f"| {gpu_hours(r, 'H100', mfu):,.1f} |")
    print("\n".join(lines))
    return rows


def git_commit():
    """The commit of this checkout (with '+changes' when the tree differs from it), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def duration(seconds):
    """12.3 s, 4.5 min, 1.17 h, 31 days, 24.6 years: a projected time at a readable scale."""
    for unit, size, digits in (("years", 365.25 * 86400, 1), ("days", 86400, 0), ("h", 3600, 2), ("min", 60, 1)):
        if seconds >= (size if unit in ("h", "min") else 2 * size):
            return f"{seconds / size:,.{digits}f} {unit}"
    return f"{seconds:.1f} s"


def gpu_peak(name):
    """(the GPU's dense bf16 peak in FLOP/s, the name it was matched by) for MFU, or (None, None) if not known."""
    return next(((v, k) for k, v in BF16_PEAK.items() if k in name), (None, None))


def bench_table(rows, device):
    """The bench as a Markdown table, with MFU against the GPU's bf16 peak where it is known."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"
    peak, _ = gpu_peak(name)
    lines = ["| method | preset | network | unit | per step | s/step | units/s | peak GiB | TFLOP/s | MFU (bf16) | budget "
             "| projected |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, f: "–" if v is None else f.format(v)
    for r in rows:
        mfu = r["achieved_tflops"] * 1e12 / peak if peak and r["achieved_tflops"] else None
        lines.append(f"| {r['method']} | {r['preset']} | {r['net']}, {r['params'] / 1e6:.1f} M | {r['unit']} "
                     f"| {r['per_step']:,} | {r['seconds_per_step']:.3f} | {r['throughput']:.4g} "
                     f"| {num(r['peak_mem_gib'], '{:.2f}')} | {num(r['achieved_tflops'], '{:.2f}')} "
                     f"| {num(mfu, '{:.1%}')} | {r['total']:,} | {duration(r['projected_hours'] * 3600)} |")
    return "\n".join(lines), name


def bench(methods, preset, channels, batch_size, steps, warmup, device, channels_last, compile, out):
    """python common.py bench: every method's training step at its preset, on this device, as a table headed by
    what was measured: the device, the peak its MFU is taken against, torch, the commit, the settings."""
    pg = Dist(device)
    rows = []
    for name in methods:
        rows.append(bench_method(name, pg.device, preset=preset, in_ch=channels, batch=batch_size, steps=steps,
                                 warmup=warmup, channels_last=channels_last, compile=compile))
        r = rows[-1]
        print(f"{name}: {r['throughput']:.4g} {r['unit']}/s, {r['seconds_per_step']:.3f} s/step, projected "
              f"{duration(r['projected_hours'] * 3600)} for {r['total']:,} {r['unit']}", file=sys.stderr)
    table, device_name = bench_table(rows, pg.device)
    peak, matched = gpu_peak(device_name)
    cuda = pg.device.type == "cuda"
    against = f"{peak / 1e12:g} TFLOP/s (dense bf16 of the {matched})" if peak else "no known peak"
    path = "bf16 autocast for the trained networks, the frozen teacher fp32 with TF32, cudnn.benchmark" if cuda else "fp32"
    head = (f"bench on {device_name} ({pg.device}), MFU against {against}, "
            f"torch {torch.__version__}, commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{steps} steps after {warmup} warm-up; training's code path: "
            f"{path}, "
            f"channels_last {channels_last}, compile {compile}, batch {batch_size or 'the presets'}")
    print(head + "\n\n" + table)
    if out:
        write_json(Path(out).with_suffix(".json"), dict(header=head, rows=rows))
        Path(out).with_suffix(".md").write_text(head + "\n\n" + table + "\n")
    return rows


UNIT_NAMES = {"trajectories": "trajectory", "images": "image", "updates": "update"}


def refuse_paper_on_cpu(method, cost=None):
    """A paper run where there is no CUDA would take weeks to years: stop at once (no step is timed) with an
    estimate from the method's counted FLOPs (cost: its PAPER_COST, dict(unit, units, flops_per_unit)) at an
    assumed CPU_FLOPS, and the same command with --preset lab."""
    if cost is None:
        raise UserError("--preset paper needs CUDA (none on this machine); pass --device cpu to run it anyway")
    argv, kept = sys.argv[1:], []
    for i, a in enumerate(argv):          # the same command with --preset lab in place of the paper preset
        if not (a == "--preset" or a.startswith("--preset=") or (i > 0 and argv[i - 1] == "--preset")):
            kept.append(a)
    lab = " ".join(["python", f"{method}.py", *kept, "--preset", "lab"])
    seconds = cost["flops_per_unit"] * cost["units"] / CPU_FLOPS
    raise UserError(f"--preset paper without CUDA: at least {duration(seconds)} on a CPU ({cost['flops_per_unit']:.3g} "
                    f"FLOP per {UNIT_NAMES.get(cost['unit'], cost['unit'])}, counted, x {cost['units']:,} {cost['unit']} "
                    f"in the preset's budget, "
                    f"at an assumed {CPU_FLOPS / 1e9:g} GFLOP/s); run `{lab}` instead, or pass --device cpu to run the "
                    "paper preset anyway")


# ----------------------------------------------------------------------------------------------
# 15. Command line: python common.py teacher ... | bench ...
# ----------------------------------------------------------------------------------------------

def prepare(dataset, data_dir, preset, fid_samples, nfe, device):
    """common.py prepare: everything a class's runs share, made once (what each student's run would otherwise make
    on its own): the shared teacher (trained, or the cached one reused), the reference statistics of FID and KID
    (runs/<dataset>/fid/) and the teacher's own samples and scores at every solver and NFE 1-5 the methods compare
    with (its eval/ folder, and the teacher's rows of the results table). Every cache is keyed by content, not by
    path or machine: a copied runs/<dataset>/ is used as is."""
    import fid
    t0 = time.time()
    fid.teacher_rows(Eval(dataset, data_dir, preset, fid_samples=fid_samples, device=device), ["euler", "heun", "dpm3m"], nfe)
    folder = RUNS / dataset_slug(dataset)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"prepared {folder} in {(time.time() - t0) / 60:.1f} min: copy it into each student's checkout (the same "
              f"path, {folder}/ beside the scripts); their {preset} runs then train no teacher and compute no "
              "reference statistics")


def main():
    p = Parser(description=first_paragraph(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="train the shared teacher (runs/<dataset>/teacher-<preset>/teacher.pt)")
    t.add_argument("--dataset", default="fashion", type=dataset_name, help="fashion | cifar10 | folder:PATH")
    t.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    t.add_argument("--preset", default="lab", choices=list(TEACHER_PRESETS), help="smoke | lab (CPU, default) | paper (CUDA)")
    t.add_argument("--out", default=None, help="output folder (default runs/<dataset>/teacher-<preset>)")
    t.add_argument("--seed", default=0, type=int, help="random seed")
    t.add_argument("--device", default=None, type=device_name, help="cpu | cuda | mps (default: cuda, else mps, else cpu)")
    t.add_argument("--batch-size", default=None, type=positive_int, help="global batch size (default: the preset's)")
    t.add_argument("--images", default=None, type=positive_int, help="training length in images (default: the preset's)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    b = sub.add_parser("bench", help="time a few training steps of every method at its preset with random weights "
                       "on this device; a table of throughput, peak memory and the projected time of the whole budget")
    b.add_argument("--preset", default="paper", choices=["smoke", "paper"], help="paper (default) | smoke (seconds, tests)")
    b.add_argument("--methods", nargs="+", default=list(BENCH_METHODS), choices=list(BENCH_METHODS), help="default: all six")
    b.add_argument("--channels", default=3, type=int, choices=[1, 3], help="image channels (3: CIFAR-10, default)")
    b.add_argument("--batch-size", default=None, type=positive_int, help="global batch (default: each method's preset)")
    b.add_argument("--steps", default=5, type=positive_int, help="timed steps per method (default 5)")
    b.add_argument("--warmup", default=2, type=checked(int, lambda v: v >= 0, "an integer >= 0"),
                   help="untimed steps first (default 2)")
    b.add_argument("--device", default=None, type=device_name, help="cpu | cuda | mps (default: cuda, else mps, else cpu)")
    b.add_argument("--channels-last", action="store_true", help="NHWC memory format for the networks (training's flag)")
    b.add_argument("--compile", action="store_true", help="torch.compile every network (training's flag; no FLOP count then)")
    b.add_argument("--out", default=None, help="also write the table to OUT.md and OUT.json")
    f = sub.add_parser("flops", help="count every method's FLOPs per training unit at its preset on the meta device (no "
                       "GPU, seconds) and project the budget's A100 and H100 hours at an assumed MFU")
    f.add_argument("--preset", default="paper", choices=["smoke", "paper"], help="paper (default) | smoke")
    f.add_argument("--methods", nargs="+", default=list(BENCH_METHODS), choices=list(BENCH_METHODS), help="default: all six")
    f.add_argument("--channels", default=3, type=int, choices=[1, 3], help="image channels (3: CIFAR-10, default)")
    f.add_argument("--mfu", default=ASSUMED_MFU, type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"),
                   help=f"the assumed model FLOP utilisation of the projection (default {ASSUMED_MFU:g})")
    r = sub.add_parser("prepare", help="for a class: train (or reuse) the shared teacher, compute the FID reference "
                       "statistics and the teacher's rows once; then copy runs/<dataset>/ into each student's checkout")
    r.add_argument("--dataset", default="fashion", type=dataset_name, help="fashion (default) | cifar10 | folder:PATH")
    r.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    r.add_argument("--preset", default="lab", choices=list(TEACHER_PRESETS), help="the students' preset (default lab)")
    r.add_argument("--fid-samples", default=None, type=fid_count, help="N of the FIDs (default: the preset's)")
    r.add_argument("--nfe", default=[1, 2, 3, 4, 5], type=positive_int, nargs="+",
                   help="the NFEs the students will run (default 1 2 3 4 5): the teacher's rows at each")
    r.add_argument("--device", default=None, type=device_name, help="cpu | cuda | mps (default: cuda, else mps, else cpu)")
    args = p.parse_args()
    if args.cmd in ("bench", "flops", "prepare"):
        import common             # the module the method files import (this file runs as __main__: another copy)
        try:
            run = dict(prepare=common.prepare, bench=common.bench, flops=common.flops_table)[args.cmd]
            return run(**{k: v for k, v in vars(args).items() if k != "cmd"})      # each flag is a parameter
        except common.UserError as e:
            raise UserError(str(e)) from None
    train_teacher(args.dataset, args.preset, args.out, args.data_dir, args.seed, args.device,
                  args.batch_size, args.resume, args.images)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
