"""SFDDM: single-fold distillation of a T-step DDPM into a T'-step DDPM.

Paper: Chi Hong, Jiyue Huang, Robert Birke, Dick Epema, Stefanie Roos, Lydia Y. Chen,
"SFDDM: Single-fold Distillation for Diffusion models", arXiv:2405.14961 (2024; ECML PKDD 2025).
Authors' code: github.com/ChiHong-Xtautau/SFDDM_Diffusion_Distillation (denoising_diffusion_pytorch/).
The paper writes alpha_t for DDPM's cumulative product; this file calls it alpha_bar.

What is implemented
- Teacher (Sec. 3.1): the shared fewstep teacher read as a discrete T-step DDPM (T = 1024) on a
  linear-beta table alpha_bar_0 = 1 > alpha_bar_1 > ... > alpha_bar_T: eps_theta(x_t, t) is the eps
  of common.vp_predict at alpha = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t).
- Student (Sec. 3.3, 3.6, App. B): T' = --nfe steps on a sub-sequence 0 = phi_0 < ... < phi_T' = T
  of teacher steps: phi_t = c*t with c = T/T' when T' divides T, else round(linspace(0, T, T'+1));
  or 'concentrated' (Sec. 4.2). Its forward process (Eq. 8) gives the marginal
  q'(x'_t | x'_0) = N(sqrt(alpha_bar_phi_t) x'_0, (1 - alpha_bar_phi_t) I) (Eq. 9): x'_t IS x_phi_t.
- "The student at its step t": fewstep's networks are denoisers D(x, sigma) conditioned on the
  noise level, not on a step index. Student step t has exactly one noise level, sigma_phi_t =
  sqrt((1 - alpha_bar_phi_t)/alpha_bar_phi_t), so eps'_Theta(x'_t, t) is the student U-Net used as
  a denoiser at sigma_phi_t (through the same VP adapter): the index t and the level sigma_phi_t
  carry the same information, and the student is only ever queried at its T' levels.
- Loss (Alg. 1; Eq. 17 with gamma'_t = 1, App. D's L1, the authors' code's hidden term): t ~ U{1..T'},
  one x = sqrt(alpha_bar_phi_t) x0 + sqrt(1 - alpha_bar_phi_t) eps for both networks,
  L = |eps_theta(x, phi_t) - eps'_Theta(x, t)|_1 + lambda_h |h_theta - h_Theta|_1, where h is the
  last hidden map before the output conv (the authors' `get_sl` output; common's features=True).
- --scratch: the paper's "From scratch" baseline (Sec. 4.1): the same fresh T'-step model trained on
  the data alone with Eq. 15 (gamma'_t = 1, DDPM's L2 on eps), no teacher, same budget.
- Sampling, both reported (<run>/ddim/, <run>/alg2/): the student's posterior, ancestrally (Alg. 2,
  Eq. 10, 13, 14), and DDIM (eta = 0) over its T' steps; x0_hat clipped to [-1, 1] in both, as
  DDPM's and the authors' samplers do (--no-clip).
- Ceiling rows, free, beside the run (sfddm-teacher-nfe<T'>/, once per teacher and phi): the teacher
  on phi with DDIM and with Alg. 2 (a perfect student's scores: the gap to them is the distillation
  error), and with DPM-Solver++(3M) on the same T' levels (what a better solver buys).

Read this before reading the numbers
- The student starts fresh (--init fresh), as in the paper and the authors' code. Eq. 17 is minimised
  by eps'_Theta(x, t) = eps_theta(x, phi_t), the teacher restricted to phi: a copy of the teacher
  (--init teacher, fewstep's option) has loss and gradient exactly 0, and Adam leaves it bitwise
  unchanged (smoke/lab nets have no dropout and run in fp32 on CPU; the paper net's dropout 0.1 and
  CUDA's bf16 autocast are all that move it). So --init teacher skips training when nothing can move
  the weights; its rows are the ceiling rows (the teacher on phi, no minutes or images claimed).
- Few steps are the paper's own limitation (Sec. 5): T' = 1 would map pure noise to the data mean
  in one posterior step and is refused; T' = 2 runs with a warning.

Deviations from the paper, and why
- The teacher is the shared EDM-trained denoiser (comparability across fewstep), not a DDPM trained
  on the table; the paper's teacher (App. D, and the code's default) uses a sigmoid schedule, here
  DDPM's linear betas (scaled by 1000/T as in the authors' code, so T changes only the
  discretisation of one continuous schedule).
- phi follows the paper (phi_T' = T). The authors' code maps its 0-based student step t to the
  0-based teacher step c*t, i.e. 1-based phi_t = c(t-1) + 1: its chain starts c-1 steps short of T
  and ends one teacher step above the data.
- 'concentrated' is our reading of Sec. 4.2: a fraction p of the interior points evenly inside a
  window of 5% of T around T/2, the rest evenly over the remaining range.
- EMA of the student (DDPM code: 0.9999 per step), counted as a half-life in images.
- Optimiser: the paper preset keeps App. D (Adam, fixed lr 2e-5, ~0.1 M steps). The lab trains a
  fresh student on the teacher's own budget (76,800 images, ~1,200 updates), so it uses the shared
  teacher's recipe (common.TEACHER_PRESETS lab: lr 2e-3, 5,000-image warm-up, grad-norm clip 1,
  EMA half-life 10,000): then fresh SFDDM, --scratch and the teacher differ only in their targets.

Run
  CPU lab:    python sfddm.py --dataset fashion --nfe 4                 # fresh student (the paper's)
  baseline:   python sfddm.py --dataset fashion --nfe 4 --scratch       # Eq. 15 on data, no teacher
  ceiling:    python sfddm.py --dataset fashion --nfe 4 --init teacher  # the teacher on phi, no training
  CUDA paper: python sfddm.py --dataset cifar10 --preset paper --nfe 16
  torchrun:   torchrun --nproc_per_node=2 sfddm.py --preset smoke
"""
import csv
import json
import math
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import fid
from common import (EVAL_SEED, Denoiser, Dist, UserError, append_zero, autocast, build_net, check_data_shape,
                    check_exports, check_finite, check_same_teacher, common_parser, count_params, ddpm_alpha_bar,
                    ema_beta, ema_update, fingerprint, first_paragraph, learning_rate, load_checkpoint, load_dataset,
                    load_state, load_teacher, main_guard, positive_int, random_batch, require_arch, run_dir,
                    sample_dpmpp, save_checkpoint, seed_all, sigma_from_alpha_bar, student_from, to_float, vp_predict)

# images: training length; batch: global batch; lr: Adam lr, reached after `warmup` images of linear
# ramp; clip: grad-norm clip (None: off); ema: EMA half-life (images); ckpt_every: images.
PRESETS = {
    "smoke": dict(images=64, batch=16, lr=2e-3, warmup=32, clip=1.0, ema=64, ckpt_every=32),
    # The teacher's lab budget and optimiser (see the docstring).
    "lab": dict(images=76_800, batch=64, lr=2e-3, warmup=5_000, clip=1.0, ema=10_000, ckpt_every=12_800),
    # App. D: Adam lr 2e-5 fixed; DDPM's batch 128 and EMA 0.9999/step (half-life 6,931 steps);
    # ~0.1 M steps, the convergence point of Tab. 2.
    "paper": dict(images=12_800_000, batch=128, lr=2e-5, warmup=0, clip=None, ema=887_000, ckpt_every=640_000),
}
WINDOW = 0.05       # Sec. 4.2: the concentrated points lie within 5% of the chain around its midpoint
CURVE_POINTS = 100  # loss.csv: the training loss averaged over this many equal windows


def parse_args(argv=None):
    p = common_parser(first_paragraph(__doc__), nfe_default=4,
                      nfe_help="T', the student's number of steps = network calls (>= 2; the paper targets 16-128)")
    p.add_argument("--teacher-steps", default=1024, type=int, help="T, the teacher DDPM's number of steps (default: 1024)")
    p.add_argument("--subseq", default="scattered", choices=["scattered", "concentrated"],
                   help="phi: 'scattered' = c*t or round(linspace), spread over the whole chain (Sec. 3.6); "
                        "'concentrated' = a fraction p around T/2 (Sec. 4.2) (default: scattered)")
    p.add_argument("--concentration", default=0.2, type=float,
                   help="p, fraction of interior phi_t inside the 5%% window around T/2 (default: 0.2)")
    p.add_argument("--hidden-weight", default=1.0, type=float,
                   help="lambda_h, weight of the hidden-variable L1 term; 0 turns it off (default: 1)")
    p.add_argument("--init", default="fresh", choices=["fresh", "teacher"],
                   help="student init: fresh as in the paper and the authors' code, or fewstep's copy of the teacher "
                        "(the loss's optimum: training is skipped when it cannot move the weights) (default: fresh)")
    p.add_argument("--scratch", action="store_true",
                   help="the paper's 'From scratch' baseline: train the fresh T'-step model on data alone (Eq. 15)")
    p.add_argument("--lr", default=None, type=learning_rate, help="Adam learning rate (default: the preset's; paper 2e-5)")
    p.add_argument("--images", default=None, type=positive_int, help="training length in images (default: the preset's)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] while sampling")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The student's chain: sub-sequence, marginals, posterior
# ----------------------------------------------------------------------------------------------

def teacher_alpha_bar(T):
    """The teacher DDPM's alpha_bar_0..T: linear betas 1e-4..0.02, scaled by 1000/T (authors' code)."""
    return ddpm_alpha_bar(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)


def subsequence(T, T_s, kind="scattered", concentration=0.2):
    """phi_0 = 0 < phi_1 < ... < phi_T' = T, an increasing sub-sequence of {0..T} (Sec. 3.6)."""
    if not 2 <= T_s <= T:
        raise UserError(f"--nfe {T_s}: the student needs 2 <= T' <= T = {T} steps")
    if kind == "scattered":
        if T % T_s == 0:
            return [T // T_s * t for t in range(T_s + 1)]                       # Sec. 3.2: phi_t = c*t
        return [math.floor(T * t / T_s + 0.5) for t in range(T_s + 1)]           # Sec. 3.6: round(linspace)
    # Sec. 4.2 'concentrated': n_in interior points at the centres of n_in equal cells of the window
    # [lo, hi], the other m evenly over [0, lo) + (hi, T] (the window cut out).
    lo, hi = T / 2 - WINDOW * T / 2, T / 2 + WINDOW * T / 2
    n_in = round(concentration * (T_s - 1))
    inside = [lo + (hi - lo) * (k + 0.5) / n_in for k in range(n_in)]
    m = T_s - 1 - n_in
    rest = [(lo + (T - hi)) * k / (m + 1) for k in range(1, m + 1)]
    outside = [u if u < lo else u + (hi - lo) for u in rest]
    phi = [0] + sorted(math.floor(u + 0.5) for u in inside + outside) + [T]
    if any(b <= a for a, b in zip(phi, phi[1:])):
        raise UserError(f"T = {T} is too short for {n_in} of T' = {T_s} steps within {WINDOW:.0%} of it: "
                        "lower --concentration or raise --teacher-steps")
    return phi


def student_alpha_bar(alpha_bar, phi):
    """Eq. 9 / App. B: the student's alpha_bar'_t = alpha_bar_{phi_t}, t = 0..T'."""
    return alpha_bar[torch.as_tensor(phi)]


def posterior(alpha_bar_s, t):
    """Eq. 10: q'(x'_{t-1} | x'_t, x'_0) = N(coef_xt x'_t + coef_x0 x'_0, var I); the paper's sigma'_t is var."""
    a_t, a_prev = alpha_bar_s[t], alpha_bar_s[t - 1]
    coef_xt = (1 - a_prev) * a_t.sqrt() / ((1 - a_t) * a_prev.sqrt())
    coef_x0 = (a_prev - a_t) / ((1 - a_t) * a_prev.sqrt())
    var = (1 - a_prev) * (a_prev - a_t) / ((1 - a_t) * a_prev)
    return coef_xt, coef_x0, var


def eps_at(D, z, alpha_bar_t, features=False):
    """eps of a network at the DDPM level alpha_bar_t: the teacher's eps_theta(z, phi_t) or the
    student's eps'_Theta(z, t); both are the U-Net as a denoiser at sigma_phi_t through the VP
    adapter. Returns (x0_hat, eps_hat, h) with h the last hidden map (or None)."""
    alpha, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    if not features:
        x0, eps, _ = vp_predict(D, z, alpha, s)
        return x0, eps, None
    x0, eps, _, extras = vp_predict(D, z, alpha, s, features=True)
    return x0, eps, extras["features"]


# ----------------------------------------------------------------------------------------------
# Distillation loss (Alg. 1), the from-scratch loss (Eq. 15), the student's samplers (Alg. 2, DDIM)
# ----------------------------------------------------------------------------------------------

def sfddm_loss(teacher, student, x0, t, eps, alpha_bar_s, hidden_weight=1.0):
    """Alg. 1, lines 3-7, with L1 (App. D) and the hidden-variable term of the authors' code.
    t: B student steps in 1..T'; eps: B noises. Returns (loss, L1 of eps, L1 of hidden maps)."""
    a = alpha_bar_s.to(x0.device, torch.float32)[t]
    x = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps    # Eq. 16 = Eq. 7 at phi_t
    features = hidden_weight > 0
    with torch.no_grad():
        _, eps_teacher, h_teacher = eps_at(teacher, x, a, features)                 # Alg. 1, line 6
    _, eps_student, h_student = eps_at(student, x, a, features)
    loss_eps = (eps_teacher - eps_student).abs().mean()                              # Alg. 1, line 7 (L1)
    loss_h = (h_teacher - h_student).abs().mean() if features else torch.zeros((), device=x0.device)
    return loss_eps + hidden_weight * loss_h, loss_eps, loss_h


def scratch_loss(student, x0, t, eps, alpha_bar_s):
    """Eq. 15 with gamma'_t = 1 (DDPM's simple loss on the student's own chain): |eps - eps'_Theta(x'_t, t)|^2.
    Returns (loss, loss, 0) in sfddm_loss's layout."""
    a = alpha_bar_s.to(x0.device, torch.float32)[t]
    x = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps    # Eq. 16
    _, eps_student, _ = eps_at(student, x, a)
    loss = ((eps - eps_student) ** 2).mean()
    return loss, loss, torch.zeros((), device=x0.device)


@torch.no_grad()
def sample_ancestral(D, z, alpha_bar_s, noise=torch.randn_like, clip=True):
    """Alg. 2: x'_T' = z ~ N(0, I); x'_{t-1} = mu'_Theta(x'_t, t) + sqrt(sigma'_t) eps, no noise at t = 1."""
    for t in range(len(alpha_bar_s) - 1, 0, -1):
        x0, _, _ = eps_at(D, z, alpha_bar_s[t])                     # f_Theta^(t)(x'_t), Eq. 11
        if clip:
            x0 = x0.clamp(-1, 1)
        coef_xt, coef_x0, var = (float(c) for c in posterior(alpha_bar_s, t))
        z = coef_xt * z + coef_x0 * x0                               # Eq. 14
        if t > 1:
            z = z + math.sqrt(var) * noise(z)                        # Eq. 13
    return z


@torch.no_grad()
def sample_ddim(D, z, alpha_bar_s, clip=True):
    """DDIM (Song et al. 2021, Eq. 12, eta = 0) over the student's T' steps; at t = 1 it returns x0_hat."""
    for t in range(len(alpha_bar_s) - 1, 0, -1):
        a, a_prev = float(alpha_bar_s[t]), float(alpha_bar_s[t - 1])
        x0, eps, _ = eps_at(D, z, alpha_bar_s[t])
        if clip:                                                     # clip, then re-derive eps (authors' code)
            x0 = x0.clamp(-1, 1)
            eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return z


def phi_samplers(D, alpha_bar_s, clip):
    """The samplers of a network on the chain phi, each unit noise -> image: DDIM and Alg. 2 (its step
    noise drawn from a fixed generator, so every run and the ceiling see the same), DPM-Solver++(3M)
    on the same T' levels (common's solver in x = z/alpha, ending in sigma_phi_0 = 0)."""
    g = torch.Generator().manual_seed(EVAL_SEED + 1)
    sigmas = append_zero(sigma_from_alpha_bar(alpha_bar_s[1:]).flip(0))
    alpha_T = float(alpha_bar_s[-1].sqrt())
    return {"ddim": lambda z: sample_ddim(D, z, alpha_bar_s, clip),
            "alg2": lambda z: sample_ancestral(D, z, alpha_bar_s, clip=clip,
                                               noise=lambda x: torch.randn(x.shape, generator=g).to(x.device)),
            "dpm3m": lambda z: sample_dpmpp(D, z / alpha_T, sigmas)}


# ----------------------------------------------------------------------------------------------
# Training (bookkeeping around Alg. 1) and evaluation
# ----------------------------------------------------------------------------------------------

def train(args, pg, cfg, teacher, net, ema, data, alpha_bar_s, phi, out):
    """Alg. 1 (or Eq. 15 with --scratch) repeated for cfg['images'] images; resumable from
    out/checkpoint.pt. Returns (stats dict, loss curve rows [images, loss, loss_eps, loss_h])."""
    D = Denoiser(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)      # each process its own data/noise
    done, seconds, loss_start, loss_avg, curve, acc = 0, 0.0, None, None, [], [0.0, 0.0, 0.0]
    mode = "scratch" if args.scratch else args.init
    ckpt_path = out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, "sfddm-training")
        if ck["phi"] != phi or ck.get("mode") != mode:
            raise UserError(f"{ckpt_path} was trained on phi = {ck['phi']} ({ck.get('mode')}), not {phi} ({mode}): "
                            "use another --out")
        check_same_teacher(ck, ckpt_path, getattr(args, "teacher_sha256", None))
        load_state(net, ck["net"], ckpt_path)
        load_state(ema, ck["ema"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        done, seconds, loss_start, loss_avg, curve, acc = (ck[k] for k in ("images", "seconds", "loss_start",
                                                                            "loss_avg", "curve", "acc"))
        pg.restore_state(gen, ck["rng"])
        pg.log(f"resuming SFDDM training at {done:,} images")
    elif args.resume:
        pg.log(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    pg.broadcast(net)
    pg.broadcast(ema)
    local, T_s = pg.batch(cfg["batch"]), len(phi) - 1
    beta = ema_beta(cfg["batch"], cfg["ema"])
    window = max(cfg["batch"], cfg["images"] // CURVE_POINTS // cfg["batch"] * cfg["batch"])
    acc = torch.tensor(acc, dtype=torch.float64)                          # sums of (loss, eps, h) in this window

    def save(path_done):
        rng = pg.gather_state(gen.get_state())
        if pg.main:
            save_checkpoint(ckpt_path, "sfddm-training", net=net.state_dict(), ema=ema.state_dict(),
                            opt=opt.state_dict(), images=path_done, seconds=time.time() - t0, rng=rng, phi=phi,
                            mode=mode, loss_start=loss_start, loss_avg=loss_avg, curve=curve, acc=acc.tolist(),
                            teacher_sha256=getattr(args, "teacher_sha256", None))

    bar = tqdm(total=cfg["images"], initial=done, unit="img", unit_scale=True, disable=not pg.main, desc="sfddm")
    t0, next_ckpt = time.time() - seconds, done + cfg["ckpt_every"]
    net.train()
    while done < cfg["images"]:
        x0 = to_float(random_batch(data, local, gen)).to(pg.device)              # Alg. 1, line 3
        t = torch.randint(1, T_s + 1, (local,), generator=gen).to(pg.device)     # line 4: t ~ U{1..T'}
        eps = torch.randn(x0.shape, generator=gen).to(pg.device)                 # line 5
        with autocast(pg.device):
            if args.scratch:
                loss, loss_eps, loss_h = scratch_loss(D, x0, t, eps, alpha_bar_s)
            else:
                loss, loss_eps, loss_h = sfddm_loss(teacher, D, x0, t, eps, alpha_bar_s, args.hidden_weight)
        check_finite(loss)
        if loss_start is None:
            loss_start = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pg.sync_grads(net.parameters())
        for group in opt.param_groups:                                            # linear warm-up
            group["lr"] = cfg["lr"] * min(1.0, (done + cfg["batch"]) / max(cfg["warmup"], 1))
        if cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["clip"])
        opt.step()                                                                # line 8
        ema_update(ema, net, beta)
        done += cfg["batch"]
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        acc += torch.tensor([loss.item(), loss_eps.item(), loss_h.item()], dtype=torch.float64)
        if done % window == 0 or done >= cfg["images"]:                           # one loss.csv row per window
            n = (done - 1) % window // cfg["batch"] + 1
            curve.append([done] + (acc / n).tolist())
            acc.zero_()
        bar.update(cfg["batch"])
        bar.set_postfix(eps=f"{loss_eps.item():.4f}", h=f"{loss_h.item():.4f}")
        if done >= next_ckpt and done < cfg["images"]:
            next_ckpt += cfg["ckpt_every"]
            save(done)
    bar.close()
    save(done)
    pg.check_in_sync(ema)
    return dict(images_seen=done, train_seconds=time.time() - t0, loss_start=loss_start, loss_end=loss_avg), curve


def save_curve(out, curve):
    """out/loss.csv (window means of the training loss on rank 0's batches) and out/loss.png (log scale)."""
    with open(out / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([["images", "loss", "loss_eps", "loss_h"]] + curve)
    if len(curve) < 2:
        return
    W, H, m = 480, 240, 30
    xs, ys = [r[0] for r in curve], [math.log10(max(r[1], 1e-12)) for r in curve]
    lo, hi = min(ys), max(ys) + 1e-9
    pts = [(m + (W - 2 * m) * (x - xs[0]) / (xs[-1] - xs[0]), H - m - (H - 2 * m) * (y - lo) / (hi - lo))
           for x, y in zip(xs, ys)]
    img = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(img)
    draw.rectangle([m, m, W - m, H - m], outline=160)
    draw.line(pts, fill=0, width=2)
    draw.text((m, 4), f"loss (log10) {10 ** hi:.3g} .. {10 ** lo:.3g} over {xs[0]:,}..{xs[-1]:,} images", fill=0)
    img.save(out / "loss.png")


def ceiling_rows(args, pg, folder, teacher, teacher_path, alpha_bar_s, phi, shape):
    """The teacher on phi with each of phi_samplers (the ceiling rows), into folder/<sampler>/, unless
    they are there for this teacher (sha256), phi, N and clipping."""
    key = dict(phi=phi, teacher_sha256=fingerprint(teacher_path), clip=not args.no_clip,
               fid_n=fid.FID_SAMPLES[args.preset] if args.fid_samples is None else args.fid_samples)
    try:
        have = all(all(json.loads((folder / s / "metrics.json").read_text()).get(k) == v for k, v in key.items())
                   for s in ("ddim", "alg2", "dpm3m"))
    except (OSError, ValueError):
        have = False
    pg.barrier()                                     # every process decides before any writes
    if have:
        pg.log(f"ceiling rows (the teacher on phi) already in {folder}")
        return
    t0 = time.time()
    for name, fn in phi_samplers(teacher, alpha_bar_s, not args.no_clip).items():
        fid.report(args, pg, folder / name, teacher, teacher_path, fn, dict(
            method="teacher", variant=f"teacher-phi-{name}", nfe=len(phi) - 1, train_seconds=0, images_seen=0,
            teacher_steps=args.teacher_steps, subseq=args.subseq, **key), shape)
    pg.log(f"ceiling rows (the teacher on phi) in {(time.time() - t0) / 60:.1f} min: {folder}")


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

def bench_step(teacher, preset, device, batch=None):
    """One update of Alg. 1 at T' = 16 of T = 1024 (the loss with its hidden-map term, the EMA).
    Unit: images; budget: the preset's images."""
    from common import image_shape
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    phi = subsequence(1024, 16)
    alpha_bar_s = student_alpha_bar(teacher_alpha_bar(1024), phi)
    net = student_from(teacher.net)
    ema = build_net(net.config).to(device).requires_grad_(False)
    D, opt, beta = Denoiser(net), torch.optim.Adam(net.parameters(), lr=cfg["lr"]), ema_beta(batch, cfg["ema"])
    shape = image_shape(net)

    def step():
        x0, eps = torch.rand((batch, *shape), device=device) * 2 - 1, torch.randn((batch, *shape), device=device)
        t = torch.randint(1, len(phi), (batch,), device=device)
        with autocast(device):
            loss = sfddm_loss(teacher, D, x0, t, eps, alpha_bar_s)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, net, beta)

    return dict(step=step, unit="images", per_step=batch, total=cfg["images"], nets=[teacher.net, net, ema])


def main():
    args = parse_args()
    cfg = dict(PRESETS[args.preset])
    cfg.update({k: v for k, v in (("batch", args.batch_size), ("lr", args.lr), ("images", args.images)) if v})
    if args.hidden_weight < 0 or not 0 <= args.concentration <= 1 or args.teacher_steps < 2:
        raise UserError("--hidden-weight must be >= 0, --concentration in [0, 1], --teacher-steps >= 2")
    if args.nfe < 2:
        raise UserError(f"--nfe {args.nfe}: SFDDM needs T' >= 2 (with T' = 1 its one posterior step maps pure "
                        "noise to E[x0 | x_T], the data mean; the paper's Sec. 5 names 1-2 steps as its limit)")
    if args.scratch and args.init == "teacher":
        raise UserError("--scratch trains a fresh model on data alone (the paper's baseline): drop --init teacher")
    phi = subsequence(args.teacher_steps, args.nfe, args.subseq, args.concentration)
    pg = Dist(args.device)
    suffix = f"-nfe{args.nfe}" + ("-concentrated" if args.subseq == "concentrated" else "")
    kind = "scratch" if args.scratch else {"fresh": "", "teacher": "tinit"}[args.init]
    out = run_dir(args, "sfddm" + (f"-{kind}" if kind else "") + suffix)
    check_exports(args, out / "ddim", out / "alg2")
    if args.nfe == 2:
        pg.log("warning: SFDDM is not meant for 2 steps (paper Sec. 5); expect blurry samples")
    alpha_bar_s = student_alpha_bar(teacher_alpha_bar(args.teacher_steps), phi)       # Eq. 9
    data, _ = load_dataset(args.dataset, args.data_dir)
    teacher, teacher_path = load_teacher(args, pg)
    check_data_shape(data, teacher, args.dataset)
    if args.hidden_weight > 0:
        require_arch(teacher.net, ("fewstep",), "SFDDM's hidden-variable term (--hidden-weight > 0; "
                     "--hidden-weight 0 drops it) reads the U-Net's last hidden map")
    args.teacher_sha256 = fingerprint(teacher_path)            # saved in the checkpoints, checked on --resume
    shape = tuple(data.shape[1:])
    ceiling = out.parent / f"sfddm-teacher{suffix}"
    sigmas = [round(float(s), 4) for s in sigma_from_alpha_bar(alpha_bar_s[1:]).flip(0)]
    if args.init == "teacher" and teacher.net.config["dropout"] == 0 and pg.device.type != "cuda":
        pg.log(f"--init teacher: the student would compute exactly the teacher's eps at its T' levels, so the "
               f"loss and its gradient are 0 and training cannot move it (no dropout, fp32; tests pin this): "
               f"training skipped, its rows are the teacher sampled on phi = {phi}")
        ceiling_rows(args, pg, ceiling, teacher, teacher_path, alpha_bar_s, phi, shape)
        pg.close()
        return
    seed_all(args.seed)
    net = student_from(teacher.net) if args.init == "teacher" else build_net(teacher.net.config).to(pg.device).train()
    ema = build_net(net.config).to(pg.device).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    pg.log(f"SFDDM{' from scratch (Eq. 15)' if args.scratch else ''}: T = {args.teacher_steps} -> T' = {args.nfe}, "
           f"phi = {phi}, student sigmas {sigmas}; {count_params(net) / 1e6:.2f} M params ({args.init} init), "
           f"{cfg['images']:,} images, batch {cfg['batch']}, lr {cfg['lr']:g}, lambda_h {args.hidden_weight:g}, "
           f"{pg.world} process(es) on {pg.device}")
    stats, curve = train(args, pg, cfg, teacher, net, ema, data, alpha_bar_s, phi, out)
    D_ema = Denoiser(ema.eval())
    if pg.main:
        save_checkpoint(out / "student.pt", "sfddm-student", net_config=ema.config, ema=ema.state_dict(), phi=phi,
                        alpha_bar=alpha_bar_s, teacher_steps=args.teacher_steps, dataset=args.dataset,
                        teacher_sha256=getattr(args, "teacher_sha256", None), **stats)
        save_curve(out, curve)
        pg.log(f"SFDDM: {stats['images_seen']:,} images in {stats['train_seconds'] / 60:.1f} min "
               f"({stats['images_seen'] / stats['train_seconds']:.0f} img/s), loss {stats['loss_start']:.4g} -> "
               f"{stats['loss_end']:.4g}; saved {out / 'student.pt'}, {out / 'loss.csv'}")

    # Evaluation: z = x'_T' ~ N(0, I) is the unit noise itself; both samplers, then the ceiling rows.
    samplers = phi_samplers(D_ema, alpha_bar_s, not args.no_clip)
    for name in ("ddim", "alg2"):
        info = dict(method="sfddm", variant="sfddm" + (f"-{kind}" if kind else "") + f"-{name}" +
                    ("-concentrated" if args.subseq == "concentrated" else ""), nfe=args.nfe, sampler=name,
                    teacher_steps=args.teacher_steps, subseq=args.subseq, phi=phi, student_sigmas=sigmas,
                    init=args.init, scratch=args.scratch, hidden_weight=args.hidden_weight, lr=cfg["lr"],
                    batch=cfg["batch"], clip=not args.no_clip, **stats)
        fid.report(args, pg, out / name, teacher, teacher_path, samplers[name], info, shape)
    ceiling_rows(args, pg, ceiling, teacher, teacher_path, alpha_bar_s, phi, shape)
    pg.close()


if __name__ == "__main__":
    main_guard(main)
