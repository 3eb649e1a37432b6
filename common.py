"""fewstep common substrate: what every distillation method needs, written to be read.

Sections, in reading order:
  1. Errors and the command-line convention shared by all scripts
  2. The compact U-Net (DDPM/ADM style), with attention maps, hidden features,
     split encoder/decoder and a zero-initialised extra conditioning input
  3. The EDM denoiser D(x, sigma) and the VP adapters (x0 / eps / v in VP notation)
  4. Noise schedules: Karras grid, cosine log-SNR, discrete DDPM tables
  5. Samplers with one signature (denoiser, x, sigmas, callback): Euler/DDIM, Heun,
     DPM-Solver++(2M/3M), the analytical first step (AFS), ancestral DDPM
  6. Data: Fashion-MNIST, CIFAR-10, any image folder
  7. Plumbing: seeds with per-sample noise, EMA, checkpoints, image grids, DDP, autocast
  8. The shared teacher (EDM training) and the evaluation every method reports

Conventions (../shared/specs/METHODS.md, section 0): images are N x C x H x W in [-1, 1]; every
network is used as a denoiser D(x, sigma) in the variance-exploding view x = x0 + sigma*eps
(Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS
2022, arXiv:2206.00364, "EDM" below). A VP process z_t = alpha_t*x0 + s_t*eps is the same process
rescaled: x = z_t/alpha_t, sigma = s_t/alpha_t.

Command line:
  python common.py teacher --dataset fashion --preset lab      # train and cache the shared teacher
  torchrun --nproc_per_node=2 common.py teacher --preset smoke  # the same on two processes
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import pickle
import sys
import tarfile
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

RUNS = Path("runs")            # every output lands under runs/<dataset>/ (git-ignored)
SIGMA_DATA = 0.5               # EDM's sigma_data: the std of the (scaled) images
CKPT_FORMAT = 1                # bumped when the checkpoint layout changes
EVAL_SEED = 1_000_000          # the noise every evaluation uses, so runs compare sample by sample


# ----------------------------------------------------------------------------------------------
# 1. Errors and the shared command line
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input (unknown dataset, impossible --nfe, missing or corrupt file, NaN loss):
    reported as one line on stderr with a non-zero exit, never as a traceback."""


def main_guard(main):
    """Run main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (checkpoints written so far are kept; rerun with --resume)", file=sys.stderr)
        sys.exit(130)


def common_parser(description, nfe_default=4, nfe_type=int, nfe_help="number of function evaluations of the student"):
    """The one CLI convention of every fewstep script; a method adds its own flags after."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion", help="fashion | cifar10 | folder:PATH (default: fashion, offline)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files (CIFAR-10 tarball or batches, Fashion-MNIST .gz)")
    p.add_argument("--nfe", default=nfe_default, type=nfe_type, help=f"{nfe_help} (default: {nfe_default})")
    p.add_argument("--preset", default="lab", choices=["smoke", "lab", "paper"],
                   help="smoke: seconds, for tests; lab: a 2-core CPU in minutes (default); paper: the published setup, CUDA")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>/<run name>)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shared teacher of the preset, trained on first use)")
    p.add_argument("--seed", default=0, type=int, help="random seed of training (evaluation noise is fixed separately)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", default=None, type=int, help="global batch size (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--fid-samples", default=None, type=int, help="N, the number of generated images for FID (default: the preset's; 0 skips FID)")
    return p


def dataset_slug(name):
    """runs/<slug>/: 'folder:/a/b' becomes 'folder-b'."""
    return "folder-" + Path(name.split(":", 1)[1]).name if name.startswith("folder:") else name


# ----------------------------------------------------------------------------------------------
# 2. The compact U-Net (Ho et al. 2020, arXiv:2006.11239; Dhariwal & Nichol 2021, arXiv:2105.05233)
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
        logits = torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(C // self.heads)
        attn = logits.softmax(dim=-1)                       # B x heads x queries x keys
        if record is not None:
            record[self.name] = attn
        h = torch.einsum("bhqk,bhck->bhcq", attn, v).reshape(B, C, H, W)
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
        self.config = dict(in_ch=in_ch, res=res, ch=ch, mults=tuple(mults), blocks=blocks,
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
    """A UNet from a stored config (a checkpoint's 'net_config'), with optional changes."""
    return UNet(**{**config, **overrides})


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# 3. The denoiser D(x, sigma) with EDM preconditioning, and the VP adapters
# ----------------------------------------------------------------------------------------------

def as_batch(value, x):
    """A scalar, 0-d or length-B tensor as a B x 1 x 1 x 1 tensor matching x."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return value.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def edm_precond(sigma, sigma_data=SIGMA_DATA):
    """EDM Table 1: c_skip, c_out, c_in, c_noise (sigma is B x 1 x 1 x 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """D(x, sigma) = c_skip*x + c_out*F(c_in*x, c_noise)  (EDM Eq. 7).
    Extra keywords (cond, attn, features) go to the U-Net; with attn/features it returns (D, extras)."""

    def __init__(self, net, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x, sigma, cond=None, **extras):
        sigma = as_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        out = self.net(c_in * x, c_noise.flatten(), cond, **extras)
        F_x, ext = out if isinstance(out, tuple) else (out, None)
        D_x = c_skip * x + c_out * F_x.float()
        return (D_x, ext) if ext is not None else D_x


def vp_from_sigma(sigma):
    """(alpha, s) of the VP process with the same signal-to-noise ratio: alpha^2 + s^2 = 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64 if not torch.is_tensor(sigma) else sigma.dtype)
    alpha = 1 / (1 + sigma**2).sqrt()
    return alpha, sigma * alpha


def sigma_from_vp(alpha, s):
    return s / alpha


def vp_predict(D, z, alpha, s, cond=None, **extras):
    """The VP adapter (METHODS.md 0): x0_hat = D(z/alpha, s/alpha), eps_hat = (z - alpha*x0_hat)/s,
    v_hat = alpha*eps_hat - s*x0_hat. alpha and s: scalars or per-sample tensors.
    Returns (x0_hat, eps_hat, v_hat), plus the extras dict when attn/features are asked for."""
    alpha, s = as_batch(alpha, z), as_batch(s, z)
    out = D(z / alpha, s / alpha, cond, **extras)
    x0, ext = out if isinstance(out, tuple) else (out, None)
    eps = (z - alpha * x0) / s
    v = alpha * eps - s * x0
    return (x0, eps, v, ext) if ext is not None else (x0, eps, v)


# ----------------------------------------------------------------------------------------------
# 4. Noise schedules
# ----------------------------------------------------------------------------------------------

def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
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


def cosine_t_from_sigma(sigma, logsnr_min=-20.0, logsnr_max=20.0):
    """Inverse of the cosine schedule: sigma = s_t/alpha_t = exp(-logsnr/2) = tan(a t + b)."""
    b = math.atan(math.exp(-logsnr_max / 2))
    a = math.atan(math.exp(-logsnr_min / 2)) - b
    return (torch.atan(torch.as_tensor(sigma, dtype=torch.float64)) - b) / a


def ddpm_alpha_bar(T=1000, beta_1=1e-4, beta_T=0.02):
    """Discrete DDPM table (Ho et al. 2020, linear betas): alpha_bar[t] for t = 0..T, alpha_bar[0] = 1."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def sigma_from_alpha_bar(alpha_bar):
    """sigma_t = s_t/alpha_t = sqrt((1 - alpha_bar_t)/alpha_bar_t)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


# ----------------------------------------------------------------------------------------------
# 5. Samplers: sampler(D, x, sigmas, callback=None, **options) -> x at sigmas[-1]
#    x starts at sigmas[0] (x = sigma_max*eps for pure noise); sigmas decrease, may end in 0.
#    callback(i, x) is called after step i.
# ----------------------------------------------------------------------------------------------

def afs_step(x, sigma_cur, sigma_next):
    """SFD's analytical first step: no network call, slope d = x/sqrt(1 + sigma^2)."""
    return x + (sigma_next - sigma_cur) * x / math.sqrt(1 + float(sigma_cur) ** 2)


def sample_euler(D, x, sigmas, callback=None, afs=False):
    """Euler = DDIM (eta 0) in sigma: d = (x - D(x, s_i))/s_i; x <- x + (s_{i+1} - s_i)*d."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if afs and i == 0:
            x = afs_step(x, t_cur, t_next)
        else:
            d = (x - D(x, t_cur)) / t_cur
            x = x + (t_next - t_cur) * d                    # Euler step.
        if callback:
            callback(i, x)
    return x


def sample_heun(D, x, sigmas, callback=None, afs=False, euler_last=False):
    """EDM Algorithm 1 (deterministic): Euler predictor, trapezoidal corrector unless s_{i+1} = 0.
    euler_last: no corrector on the last step either (EDM's rule for its step to 0, carried over to a
    grid that ends at sigma_min: a corrector there divides the network's error by sigma_min)."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if afs and i == 0:
            x = afs_step(x, t_cur, t_next)
        else:
            d_cur = (x - D(x, t_cur)) / t_cur
            x_next = x + (t_next - t_cur) * d_cur           # Euler step.
            if t_next > 0 and not (euler_last and i == len(sigmas) - 2):   # Apply 2nd order correction.
                d_prime = (x_next - D(x_next, t_next)) / t_next
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            x = x_next
        if callback:
            callback(i, x)
    return x


def dynamic_threshold(x0, quantile=0.995):
    """Imagen's dynamic thresholding (used by the SFD authors' teacher): s = max(q(|x0|), 1)."""
    s = x0.abs().flatten(1).quantile(quantile, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
    return x0.clamp(-s, s) / s


def dpmpp_step(x, t_cur, t_next, D0, history, order):
    """One DPM-Solver++ multistep update from t_cur to t_next > 0 (METHODS.md 0), given
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


def sample_dpmpp(D, x, sigmas, callback=None, order=3, afs=False, threshold=False, lower_order_final=True):
    """DPM-Solver++(2M/3M), data prediction, multistep (Lu et al. 2022, arXiv:2211.01095, Alg. 2).
    Order ramps up 1, 2, 3 at the start and, with lower_order_final, down at the end: that keeps
    few-step sampling stable; the first-order start and end steps make the global order 2
    asymptotically, though each step in between is third order."""
    sigmas = [float(s) for s in sigmas]
    n = len(sigmas) - 1
    history = []                                                     # (D, h) of past steps, newest first
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if afs and i == 0:
            x = afs_step(x, t_cur, t_next)
        else:
            D0 = D(x, t_cur)
            if threshold:
                D0 = dynamic_threshold(D0)
            if t_next == 0:
                x = D0                                               # lambda = inf: land on the denoised image
            else:
                k = min(order, len(history) + 1, n - i if lower_order_final else order)
                x = dpmpp_step(x, t_cur, t_next, D0, history, k)
                history = [(D0, math.log(t_cur / t_next))] + history[:1]
        if callback:
            callback(i, x)
    return x


def sample_ddpm(D, x, sigmas, callback=None, noise=torch.randn_like):
    """Ancestral DDPM (Ho et al. 2020, Eq. 6-7) on the sigmas of a VP table, in the x = z/alpha
    view: x <- x0 + sigma_down*eps_hat + sigma_up*noise, sigma_up^2 = s'^2 (s^2 - s'^2)/s^2,
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


SAMPLERS = {
    "euler": sample_euler,
    "heun": lambda D, x, sigmas, callback=None, **kw: sample_heun(D, x, sigmas, callback, euler_last=True, **kw),
    "dpm2m": lambda D, x, sigmas, callback=None, **kw: sample_dpmpp(D, x, sigmas, callback, order=2, **kw),
    "dpm3m": lambda D, x, sigmas, callback=None, **kw: sample_dpmpp(D, x, sigmas, callback, order=3, **kw),
    "ddpm": sample_ddpm,
}
SAMPLER_NAMES = {"euler": "Euler", "heun": "Heun", "dpm2m": "DPM-Solver++(2M)", "dpm3m": "DPM-Solver++(3M)", "ddpm": "DDPM"}


def teacher_sigmas(sampler, nfe, sigma_min=0.002, sigma_max=80.0):
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
# 6. Data: uint8 tensors N x C x 32 x 32 in memory (all three datasets are small)
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
DOWNLOAD_DIR = Path.home() / ".cache" / "fewstep"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, md5):
    """Fetch url to path (temp file + rename) and check its md5; UserError when offline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        print(f"downloading {url} -> {path}", file=sys.stderr)
        urllib.request.urlretrieve(url, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e.__class__.__name__}: {e})") from None
    if md5sum(tmp) != md5:
        tmp.unlink()
        raise UserError(f"{url}: checksum mismatch (expected md5 {md5}); the download is corrupt")
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


def _unpickle(f, where):
    try:
        d = pickle.load(f, encoding="bytes")
        return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], np.int64)
    except Exception as e:     # a corrupt batch can fail in many ways; all mean the same to the user
        raise UserError(f"{where}: not a CIFAR-10 python batch ({e.__class__.__name__})") from None


def load_cifar10(split, data_dir=None):
    """CIFAR-10 (Krizhevsky 2009), python version: the tarball (md5-checked) or its extracted batches."""
    dirs = [Path(data_dir)] if data_dir else []
    dirs.append(DOWNLOAD_DIR)
    for d in dirs:
        for batch_dir in (d / "cifar-10-batches-py", d):
            if all((batch_dir / b).exists() for b in _cifar_batches(split)):
                parts = []
                for b in _cifar_batches(split):
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
    """float [-1, 1] -> uint8, the way a saved PNG would hold it."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# 7. Plumbing: seeds, EMA, checkpoints, image grids, DDP, autocast
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


def save_checkpoint(path, kind, **payload):
    """Write a checkpoint atomically (temp file, then rename): an interrupted write never
    replaces a good file. kind names what it holds ('teacher', 'sfd-student', ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fewstep": CKPT_FORMAT, "kind": kind, **payload}, tmp)
    os.replace(tmp, path)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Dist:
    """The process group: works under plain `python` (world 1) and under `torchrun` (gloo on
    CPU, nccl on CUDA). Only rank 0 writes files and prints."""

    def __init__(self, device=None):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda":                    # each process its own GPU (torch.cuda calls need the index)
            device = f"cuda:{local}"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def batch(self, global_batch):
        """This process's share of the global batch."""
        if global_batch % self.world:
            raise UserError(f"batch size {global_batch} is not divisible by the {self.world} processes")
        return global_batch // self.world

    def sync_grads(self, params):
        """Average gradients over processes (one all-reduce of a flat vector)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

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

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def log(self, *args):
        if self.main:
            tqdm.write(" ".join(str(a) for a in args))


def autocast(device):
    """bf16 autocast on CUDA; full precision on CPU (every path runs there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def check_finite(loss, what="loss"):
    if not torch.isfinite(loss).all():
        raise UserError(f"{what} is {loss.item()} (not finite): lower the learning rate or check the data; "
                        "the last checkpoint is kept")


def random_batch(images, batch_size, generator):
    """A random minibatch (uint8), drawn with replacement: its only state is the generator's,
    so a resumed run draws exactly what an uninterrupted one would have."""
    return images[torch.randint(len(images), (batch_size,), generator=generator)]


# ----------------------------------------------------------------------------------------------
# 8. The shared teacher: EDM training (EDM Sec. 5, Table 1 "Ours")
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
                  batch_size=None, resume=False, images=None):
    """Train the shared teacher; returns the path of teacher.pt. Resumable from out/checkpoint.pt."""
    cfg = dict(TEACHER_PRESETS[preset])
    cfg["batch"] = batch_size or cfg["batch"]
    cfg["images"] = images or cfg["images"]
    out = Path(out or teacher_dir(dataset, preset))
    pg = Dist(device)
    data, _ = load_dataset(dataset, data_dir)
    seed_all(seed)
    net = UNet(in_ch=data.shape[1], res=data.shape[2], **NET_CONFIGS[preset]).to(pg.device)
    ema = UNet(**net.config).to(pg.device).requires_grad_(False)
    D = Denoiser(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(seed * 1000 + pg.rank)      # each process its own data/noise
    done, seconds = 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, "teacher-training")
        load_state(net, ck["net"], ckpt_path)
        load_state(ema, ck["ema"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        done, seconds = ck["images"], ck["seconds"]
        pg.restore_state(gen, ck["rng"])
        pg.log(f"resuming teacher training at {done:,} images")
    elif resume:
        pg.log(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    if done == 0:
        ema.load_state_dict(net.state_dict())
    pg.broadcast(net)
    pg.broadcast(ema)
    local = pg.batch(cfg["batch"])
    pg.log(f"teacher: {dataset}, preset {preset}, {count_params(net) / 1e6:.2f} M params, "
           f"{cfg['images']:,} images, batch {cfg['batch']}, {pg.world} process(es) on {pg.device}")
    bar = tqdm(total=cfg["images"], initial=done, unit="img", unit_scale=True, disable=not pg.main, desc="teacher")
    beta = ema_beta(cfg["batch"], cfg["ema"])
    t0 = time.time() - seconds
    next_ckpt = done + cfg["ckpt_every"]
    net.train()
    while done < cfg["images"]:
        x0 = to_float(random_batch(data, local, gen)).to(pg.device)
        with autocast(pg.device):
            loss = edm_loss(D, x0, gen)
        check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pg.sync_grads(net.parameters())
        for group in opt.param_groups:        # linear warm-up (EDM: lr_rampup_kimg)
            group["lr"] = cfg["lr"] * min(1.0, (done + cfg["batch"]) / cfg["warmup"])
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        opt.step()
        ema_update(ema, net, beta)
        done += cfg["batch"]
        bar.update(cfg["batch"])
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if done >= next_ckpt and done < cfg["images"]:
            next_ckpt += cfg["ckpt_every"]
            rng = pg.gather_state(gen.get_state())
            if pg.main:
                save_checkpoint(ckpt_path, "teacher-training", net=net.state_dict(), ema=ema.state_dict(),
                                opt=opt.state_dict(), images=done, seconds=time.time() - t0, rng=rng)
    bar.close()
    seconds = time.time() - t0
    pg.check_in_sync(ema)
    path = out / "teacher.pt"
    rng = pg.gather_state(gen.get_state())
    if pg.main:
        save_checkpoint(path, "teacher", net_config=ema.config, ema=ema.state_dict(), dataset=dataset, preset=preset,
                        images=done, seconds=seconds)
        save_checkpoint(ckpt_path, "teacher-training", net=net.state_dict(), ema=ema.state_dict(),
                        opt=opt.state_dict(), images=done, seconds=seconds, rng=rng)
        teacher = Denoiser(ema.eval())
        x = PerSampleNoise(EVAL_SEED, range(64), pg.device).randn(*data.shape[1:]) * 80.0
        with torch.no_grad():
            grid = sample_dpmpp(teacher, x, teacher_sigmas("dpm3m", 35))
        save_grid(grid, out / "samples.png", nrow=8)
        mem = (f", peak {torch.cuda.max_memory_allocated(pg.device) / 2**30:.2f} GiB on the GPU"
               if pg.device.type == "cuda" else "")
        pg.log(f"teacher: {done:,} images in {seconds / 60:.1f} min ({done / seconds:.0f} img/s{mem}), "
               f"{count_params(ema) / 1e6:.2f} M params, ranks in sync; saved {path} and {out / 'samples.png'}")
    pg.barrier()
    return path


def load_teacher(args, pg=None):
    """The frozen teacher Denoiser (EMA weights): --teacher PATH, else the cached shared teacher of
    the preset, trained first (with a time estimate) if missing. Returns (denoiser, path)."""
    path = Path(args.teacher) if args.teacher else teacher_dir(args.dataset, args.preset) / "teacher.pt"
    if not args.teacher and not path.exists():
        est = TEACHER_PRESETS[args.preset]["minutes"]
        print(f"no cached {args.preset} teacher for {args.dataset} at {path}: training it now "
              f"(about {est:g} min on a 2-core CPU for lab; once per dataset and preset)", file=sys.stderr)
        train_teacher(args.dataset, args.preset, data_dir=args.data_dir, device=getattr(args, "device", None), resume=True)
    ck = load_checkpoint(path, "teacher")
    net = build_net(ck["net_config"])
    load_state(net, ck["ema"], path)
    device = pg.device if pg else (args.device or "cpu")
    return Denoiser(net).to(device).eval().requires_grad_(False), path


def student_from(teacher_net, cond_dim=0):
    """A trainable copy of the teacher's U-Net, optionally with a zero-initialised extra condition
    input (so it starts out computing exactly what the teacher computes)."""
    net = build_net(teacher_net.config, cond_dim=cond_dim).to(next(teacher_net.parameters()).device)
    missing, unexpected = net.load_state_dict(teacher_net.state_dict(), strict=False)
    assert not unexpected and all(".cond." in k for k in missing), (missing, unexpected)
    return net.train().requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# 9. Evaluation every method reports (metrics.json, samples.png, one summary line)
# ----------------------------------------------------------------------------------------------

FID_SAMPLES = {"smoke": 0, "lab": 500, "paper": 50_000}       # N per preset (FID depends on N; ~1 min per FID-500 on 2 cores)
REFERENCE_NFE = 35                                            # the teacher's "ground truth" sampler: DPM-Solver++(3M), 35 NFE


def run_dir(args, name):
    return Path(args.out) if args.out else RUNS / dataset_slug(args.dataset) / name


def eval_noise(n, shape, batch):
    """The fixed evaluation noise (unit Gaussian), in batches; sample k is the same in every run."""
    for start in range(0, n, batch):
        yield PerSampleNoise(EVAL_SEED, range(start, min(n, start + batch))).randn(*shape)


@torch.no_grad()
def generate(sample_fn, n, shape, batch, device, desc):
    """Images in [-1, 1] from sample_fn(unit noise on device), over the fixed evaluation noise."""
    out = [sample_fn(eps.to(device)).clamp(-1, 1).cpu()
           for eps in tqdm(eval_noise(n, shape, batch), total=math.ceil(n / batch), desc=desc, leave=False)]
    return torch.cat(out)


def rms_distance(a, b):
    """RMS pixel distance of the saved (uint8) images, in units of the [-1, 1] range."""
    return ((to_uint8(a).float() - to_uint8(b).float()) ** 2).mean().sqrt().item() / 127.5


def teacher_baseline(teacher, teacher_path, args, solver, nfe, n, shape, device, with_fid):
    """FID and RMS-to-reference of the teacher itself with `solver` at `nfe`, computed once per
    teacher and N and cached next to the teacher (eval/). Returns (metrics dict, samples)."""
    cache = Path(teacher_path).parent / "eval"
    sigmas = teacher_sigmas(solver, nfe)
    key = f"{solver}-nfe{nfe}-to{sigmas[-1]:g}-n{n}"     # the grid's end is in the name: no stale cache
    batch = args.batch_size or 250
    samples_path = cache / f"{key}.pt"
    if samples_path.exists():
        samples = to_float(load_checkpoint(samples_path, "samples")["images"])
    else:
        samples = generate(lambda eps: SAMPLERS[solver](teacher, eps * sigmas[0].item(), sigmas), n, shape, batch,
                           device, f"teacher {SAMPLER_NAMES[solver]} {nfe} NFE")
        save_checkpoint(samples_path, "samples", images=to_uint8(samples))
    metrics_path = cache / f"{key}.json"
    if not with_fid:
        return {"fid": None}, samples
    if metrics_path.exists():
        return json.loads(metrics_path.read_text()), samples
    metrics = {"fid": fid_or_none(samples, args, device)}
    write_json(metrics_path, metrics)
    return metrics, samples


def fid_or_none(samples, args, device):
    if len(samples) < 2:
        return None
    import fid                                       # the FID module is only needed when N > 0
    return fid.fid_of_samples(samples, args.dataset, args.data_dir, device)


def report(args, pg, out, teacher, teacher_path, sample_fn, info, shape):
    """Evaluate a student against its teacher and write out/metrics.json and out/samples.png.

    sample_fn(eps) maps unit Gaussian noise (N x C x H x W) to images in [-1, 1], so every method
    and the teacher see the same noise. info: method, variant, nfe, train_seconds, images_seen, ...
    Metrics (N = args.fid_samples): the student's FID-N; the teacher's FID-N with DPM-Solver++(3M)
    and Euler at the same NFE; teacher_rms = RMS distance from the teacher's 35-NFE DPM-Solver++(3M)
    samples of the same noise (for the student and for both teacher solvers)."""
    if not pg.main:
        pg.barrier()
        return None
    import fid                                        # deferred: fid.py imports common
    n = FID_SAMPLES[args.preset] if args.fid_samples is None else args.fid_samples
    n_rms = max(n, 64)                                # teacher_rms is measured even when FID is skipped
    device = pg.device
    cost = {}                                         # training throughput and (CUDA) peak memory, before evaluation
    if info.get("train_seconds"):
        cost["img_per_s"] = info.get("images_seen", 0) / info["train_seconds"]
    if device.type == "cuda":
        cost["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    batch = args.batch_size or 250
    student = generate(sample_fn, n_rms, shape, batch, device, "student samples")
    save_grid(student[:64], out / "samples.png", nrow=8)
    ref_metrics, ref = teacher_baseline(teacher, teacher_path, args, "dpm3m", REFERENCE_NFE, n_rms, shape, device, n >= 2)
    metrics = {"method": info["method"], "variant": info.get("variant", info["method"]), "dataset": args.dataset,
               "preset": args.preset, "nfe": info["nfe"], "fid_n": n if n >= 2 else 0,
               "fid": fid_or_none(student[:n], args, device), "teacher_rms": rms_distance(student, ref)}
    nfe = info["nfe"]
    for solver in ("dpm3m", "euler"):
        if solver == "dpm3m" and nfe == 1:        # one call: DPM-Solver++ is Euler
            continue
        m, s = teacher_baseline(teacher, teacher_path, args, solver, nfe, n_rms, shape, device, n >= 2)
        metrics[f"teacher_fid_{solver}"] = m["fid"] if n >= 2 else None
        metrics[f"teacher_rms_{solver}"] = rms_distance(s, ref)
    metrics["teacher_fid_dpm3m_35"] = ref_metrics["fid"] if n >= 2 else None
    metrics["rms_n"] = n_rms
    metrics["teacher"] = str(teacher_path)
    metrics["command"] = " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])
    metrics.update(cost)
    metrics.update({k: v for k, v in info.items() if k not in metrics})
    write_json(out / "metrics.json", metrics)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    label = fid.fid_label(n) if n >= 2 else "FID"
    tq = metrics.get("teacher_rms_dpm3m", metrics.get("teacher_rms_euler"))
    tf = metrics.get("teacher_fid_dpm3m", metrics.get("teacher_fid_euler"))
    print(f"{metrics['variant']} {args.dataset} NFE {nfe}: student {label} {fmt(metrics['fid'])} vs teacher "
          f"DPM-Solver++(3M) {fmt(tf)} (Euler {fmt(metrics.get('teacher_fid_euler'))}, 35-NFE "
          f"{fmt(metrics['teacher_fid_dpm3m_35'])}); teacher_rms student {metrics['teacher_rms']:.4f} vs teacher "
          f"{tq:.4f}; {info.get('train_seconds', 0) / 60:.1f} min, {info.get('images_seen', 0):,} images; {out}")
    pg.barrier()
    return metrics


def teacher_rows(args, solvers, nfes):
    """The teacher's own rows of the results table: each solver at each NFE it can spend exactly,
    measured like a student (same N, same noise) into runs/<dataset>/teacher-<preset>-rows/."""
    pg = Dist(args.device)
    teacher, path = load_teacher(args, pg)
    shape = (teacher.net.config["in_ch"], teacher.net.config["res"], teacher.net.config["res"])
    n = FID_SAMPLES[args.preset] if args.fid_samples is None else args.fid_samples
    n_rms = max(n, 64)
    _, ref = teacher_baseline(teacher, path, args, "dpm3m", REFERENCE_NFE, n_rms, shape, pg.device, n >= 2)
    pairs = [(s, k) for s in solvers for k in nfes          # Heun spends odd NFEs; at 1 NFE every solver is Euler
             if not (s == "heun" and k % 2 == 0) and not (s != "euler" and k == 1)]
    for solver, nfe in dict.fromkeys(pairs + [("dpm3m", REFERENCE_NFE)]):     # + the teacher at its best NFE
        t0 = time.time()
        m, samples = teacher_baseline(teacher, path, args, solver, nfe, n_rms, shape, pg.device, n >= 2)
        out = run_dir(args, f"teacher-{args.preset}-rows") / f"{solver}-nfe{nfe}"
        write_json(out / "metrics.json", {
            "method": "teacher", "variant": f"teacher-{solver}", "dataset": args.dataset, "preset": args.preset,
            "nfe": nfe, "fid_n": n if n >= 2 else 0, "fid": m["fid"], "teacher_rms": rms_distance(samples, ref),
            "rms_n": n_rms, "teacher": str(path), "train_seconds": 0, "images_seen": 0,
            "command": " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])})
        pg.log(f"teacher {SAMPLER_NAMES[solver]} {nfe} NFE: FID-{n} {m['fid']}, teacher_rms "
               f"{rms_distance(samples, ref):.4f} ({time.time() - t0:.0f} s)")


# ----------------------------------------------------------------------------------------------
# 10. Command line: python common.py teacher ... | rows ...
# ----------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description="fewstep substrate. 'teacher' trains and caches the shared teacher "
                                "of a dataset with the EDM loss (Karras et al. 2022).")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="train the shared teacher (runs/<dataset>/teacher-<preset>/teacher.pt)")
    t.add_argument("--dataset", default="fashion", help="fashion | cifar10 | folder:PATH")
    t.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    t.add_argument("--preset", default="lab", choices=list(TEACHER_PRESETS), help="smoke | lab (CPU, default) | paper (CUDA)")
    t.add_argument("--out", default=None, help="output folder (default runs/<dataset>/teacher-<preset>)")
    t.add_argument("--seed", default=0, type=int, help="random seed")
    t.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    t.add_argument("--batch-size", default=None, type=int, help="global batch size (default: the preset's)")
    t.add_argument("--images", default=None, type=int, help="training length in images (default: the preset's)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    r = sub.add_parser("rows", help="the teacher's rows of the results table: Euler, Heun, DPM-Solver++(3M) at "
                       "each NFE, FID at the preset's N and teacher_rms (runs/<dataset>/teacher-<preset>-rows/)")
    r.add_argument("--dataset", default="fashion", help="fashion | cifar10 | folder:PATH")
    r.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    r.add_argument("--preset", default="lab", choices=list(TEACHER_PRESETS), help="the teacher's preset (default lab)")
    r.add_argument("--teacher", default=None, help="teacher checkpoint (default: the preset's shared teacher)")
    r.add_argument("--nfe", default=[1, 2, 3, 4, 5], type=int, nargs="+", help="network calls (default 1 2 3 4 5)")
    r.add_argument("--solvers", default=["euler", "heun", "dpm3m"], nargs="+", choices=["euler", "heun", "dpm2m", "dpm3m"])
    r.add_argument("--fid-samples", default=None, type=int, help="N (default: the preset's)")
    r.add_argument("--out", default=None, help="output folder (default runs/<dataset>/teacher-<preset>-rows)")
    r.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    r.add_argument("--batch-size", default=None, type=int, help="sampling batch (default 250)")
    args = p.parse_args()
    if args.cmd == "rows":
        return teacher_rows(args, args.solvers, args.nfe)
    train_teacher(args.dataset, args.preset, args.out, args.data_dir, args.seed, args.device,
                  args.batch_size, args.resume, args.images)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
