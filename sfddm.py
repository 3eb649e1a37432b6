"""sfddm.py: SFDDM, single-fold distillation of a T-step DDPM teacher into a T'-step DDPM: Hong, Huang, Birke,
Epema, Roos, Chen, "SFDDM: Single-fold Distillation for Diffusion models", arXiv:2405.14961 (ECML PKDD 2025).

Run
  CPU lab:    python sfddm.py --dataset fashion --nfe 4                 # fresh student (the paper's)
  baseline:   python sfddm.py --dataset fashion --nfe 4 --scratch       # Eq. 15 on data, no teacher
  ceiling:    python sfddm.py --dataset fashion --nfe 4 --init teacher  # the teacher on phi, no training
  CUDA paper: python sfddm.py --dataset cifar10 --preset paper --nfe 16
  torchrun:   torchrun --nproc_per_node=2 sfddm.py --preset smoke

What is implemented (the paper's alpha_t, DDPM's cumulative product, is alpha_bar here)
- Teacher (Sec. 3.1): the shared teacher read as a T-step DDPM (T = 1024, linear betas scaled by 1000/T, the authors'
  linear_beta_schedule; see Deviations); eps_theta(x_t, t) is common.vp_predict's eps at alpha_bar_t.
- Student (Sec. 3.3, 3.6, App. B): T' = --nfe steps on phi_0 = 0 < ... < phi_T' = T (c*t, round(linspace), or
  Sec. 4.2's 'concentrated'); its marginal at t is the teacher's at phi_t (Eq. 9). fewstep's networks are
  denoisers D(x, sigma): eps'_Theta(x'_t, t) is the student at sigma_phi_t, step t's one noise level.
- Alg. 1 (sfddm_loss): t ~ U{1..T'}, one x = x_phi_t for both networks, the L1 of their eps (App. D) + lambda_h the
  L1 of their last hidden maps (the authors' code's get_sl). --scratch: the paper's "From scratch" baseline
  (Sec. 4.1, scratch_loss: Eq. 15 on the data alone, no teacher, the same budget).
- Sampling, both reported (<run>/ddim/, <run>/alg2/): Alg. 2 (Eq. 10, 13, 14) and DDIM (eta = 0), x0_hat clipped
  (--no-clip); beside the run the ceiling rows (sfddm-teacher-nfe<T'>/): the teacher on phi with both, and
  with DPM-Solver++(3M) on the same T' levels. A copy of the teacher is Eq. 17's optimum (loss and gradient 0),
  so --init teacher skips training where nothing can move it (no dropout, fp32): its rows are the ceiling's.
- T' = 1 (one posterior step maps noise to the data mean) is refused, T' = 2 warned about (Sec. 5).

Deviations
- The shared EDM-trained teacher (comparability across fewstep), not a DDPM trained on the table with the paper's
  sigmoid schedule; phi_T' = T as the paper (the authors' code's phi_t = c(t-1) + 1 ends c-1 steps short of T).
- Linear betas: the authors' linear_beta_schedule, which their run does not use (run.py builds GaussianDiffusion without
  beta_schedule, whose default is sigmoid); the table only places the student's levels on the shared teacher.
- Paper preset: App. D's lr 2e-5 and DDPM's batch 128 and EMA; the authors' run.py trains with batch 50, Adam 2e-4, no EMA.
- 'concentrated' is our reading of Sec. 4.2 (subsequence); the EMA is a half-life in images.
- Lab preset: a fresh student on the shared teacher's own lab budget and recipe (common.TEACHER_PRESETS: lr 2e-3,
  warm-up, grad clip 1), so SFDDM, --scratch and the teacher differ only in their targets. Paper: App. D.
"""
import functools
import json
import math
import time

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import torch

import fid

# images: training length; batch: global batch; lr: Adam lr, reached after `warmup` images of linear
# ramp; grad_clip: grad-norm clip (None: off); ema: EMA half-life (images); ckpt_every: images.
PRESETS = {
    "smoke": dict(images=64, batch=16, lr=2e-3, warmup=32, grad_clip=1.0, ema=64, ckpt_every=32),
    # The teacher's lab budget and optimiser (see the header).
    "lab": dict(images=76_800, batch=64, lr=2e-3, warmup=5_000, grad_clip=1.0, ema=10_000, ckpt_every=12_800),
    # App. D: Adam lr 2e-5 fixed; DDPM's batch 128 and EMA 0.9999/step (half-life 6,931 steps);
    # ~0.1 M steps, the convergence point of Tab. 2.
    "paper": dict(images=12_800_000, batch=128, lr=2e-5, warmup=0, grad_clip=None, ema=887_000, ckpt_every=640_000),
}
WINDOW = 0.05       # Sec. 4.2: the concentrated points lie within 5% of the chain around its midpoint


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4, presets=PRESETS, paper_cost=PAPER_COST,
                             nfe_help="T', the student's number of steps = network calls (>= 2; the paper: 16-128)")
    p.add_argument("--teacher-steps", default=1024, type=int, help="T, the teacher DDPM's number of steps "
                   "(default: 1024)")
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
    common.preset_flag(p, "lr", common.learning_rate, "Adam learning rate")
    common.preset_flag(p, "images", common.positive_int, "training length in images")
    p.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] while sampling")
    args = p.parse_args(argv)
    if args.hidden_weight < 0 or not 0 <= args.concentration <= 1 or args.teacher_steps < 2:
        raise common.UserError("--hidden-weight must be >= 0, --concentration in [0, 1], --teacher-steps >= 2")
    if args.nfe < 2:
        raise common.UserError(f"--nfe {args.nfe}: SFDDM needs T' >= 2 (with T' = 1 its one posterior step maps pure "
                               "noise to E[x0 | x_T], the data mean; the paper's Sec. 5 names 1-2 steps as its limit)")
    if args.scratch and args.init == "teacher":
        raise common.UserError("--scratch trains a fresh model on data alone (the paper's baseline): "
                               "drop --init teacher")
    return args


# ----------------------------------------------------------------------------------------------
# The student's chain: sub-sequence, marginals, posterior
# ----------------------------------------------------------------------------------------------

def teacher_alpha_bar(T):
    """The teacher DDPM's alpha_bar_0..T: linear betas 1e-4..0.02, scaled by 1000/T (the authors' linear_beta_schedule,
    denoising_diffusion_pytorch.py; their run uses its sigmoid default, see the header)."""
    return common.ddpm_alpha_bar(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)


def subsequence(T, T_s, kind="scattered", concentration=0.2):
    """phi_0 = 0 < phi_1 < ... < phi_T' = T, an increasing sub-sequence of {0..T} (Sec. 3.6)."""
    if not 2 <= T_s <= T:
        raise common.UserError(f"--nfe {T_s}: the student needs 2 <= T' <= T = {T} steps")
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
        raise common.UserError(f"T = {T} is too short for {n_in} of T' = {T_s} steps within {WINDOW:.0%} of it: "
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
        x0, eps, _ = common.vp_predict(D, z, alpha, s)
        return x0, eps, None
    x0, eps, _, extras = common.vp_predict(D, z, alpha, s, features=True)
    return x0, eps, extras["features"]


# ----------------------------------------------------------------------------------------------
# Distillation loss (Alg. 1), the from-scratch loss (Eq. 15), the student's samplers (Alg. 2, DDIM)
# ----------------------------------------------------------------------------------------------

def sfddm_loss(student, teacher, x0, gen, *, alpha_bar_s, hidden_weight=1.0):
    """Alg. 1, lines 4-7, for a batch x0 (line 3, drawn by train_loop): Eq. 17 with gamma'_t = 1 as App. D's L1,
    plus lambda_h times the L1 of the last hidden maps (the authors' code). alpha_bar_s: the student's
    alpha_bar'_0..T' (Eq. 9). Returns (loss, {loss_eps, loss_h}); line 8's step is train_loop's."""
    a_s = alpha_bar_s.to(x0.device, torch.float32)
    t = torch.randint(1, len(a_s), (len(x0),), generator=gen).to(x0.device)      # line 4: t ~ U{1..T'}
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)                     # line 5: eps ~ N(0, I)
    a = a_s[t]                                                                   # alpha_bar'_t = alpha_bar_phi_t
    x = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps  # Eq. 16 = Eq. 7 at phi_t
    features = hidden_weight > 0
    with torch.no_grad():
        _, eps_teacher, h_teacher = eps_at(teacher, x, a, features)              # line 6: eps_theta(x, phi_t)
    _, eps_student, h_student = eps_at(student, x, a, features)                  # ... and eps'_Theta(x, t)
    loss_eps = (eps_teacher - eps_student).abs().mean()                          # line 7 (L1)
    loss_h = (h_teacher - h_student).abs().mean() if features else torch.zeros((), device=x0.device)
    return loss_eps + hidden_weight * loss_h, {"loss_eps": loss_eps, "loss_h": loss_h}


def scratch_loss(student, teacher, x0, gen, *, alpha_bar_s, hidden_weight=0.0):
    """sfddm_loss's place for --scratch: Eq. 15 with gamma'_t = 1 (DDPM's simple loss on the student's own chain),
    |eps - eps'_Theta(x'_t, t)|^2, on the data alone (teacher and hidden_weight unused)."""
    a_s = alpha_bar_s.to(x0.device, torch.float32)
    t = torch.randint(1, len(a_s), (len(x0),), generator=gen).to(x0.device)      # t ~ U{1..T'}
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    a = a_s[t]
    x = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps  # Eq. 16
    _, eps_student, _ = eps_at(student, x, a)
    loss = ((eps - eps_student) ** 2).mean()                                     # Eq. 15
    return loss, {"loss_eps": loss, "loss_h": torch.zeros((), device=x0.device)}


@torch.no_grad()
def sample_ancestral(D, z, alpha_bar_s, noise=torch.randn_like, clip=True):
    """Alg. 2: x'_T' = z ~ N(0, I); x'_{t-1} = mu'_Theta(x'_t, t) + sqrt(sigma'_t) eps, no noise at t = 1."""
    on_device = common.on_device(alpha_bar_s, z.device)             # one copy, not one per step
    for t in range(len(alpha_bar_s) - 1, 0, -1):
        x0, _, _ = eps_at(D, z, on_device[t])                       # f_Theta^(t)(x'_t), Eq. 11
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
    on_device = common.on_device(alpha_bar_s, z.device)             # one copy, not one per step
    for t in range(len(alpha_bar_s) - 1, 0, -1):
        a, a_prev = float(alpha_bar_s[t]), float(alpha_bar_s[t - 1])
        x0, eps, _ = eps_at(D, z, on_device[t])
        if clip:                                                     # clip, then re-derive eps (authors' code)
            x0 = x0.clamp(-1, 1)
            eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return z


def phi_samplers(D, alpha_bar_s, clip):
    """The samplers of a network on the chain phi, each unit noise -> image: DDIM and Alg. 2 (its step
    noise drawn from a fixed generator in batch order, so every one-process run and the ceiling see the same;
    a run on several processes draws in another order: its Alg. 2 images differ from one process's), DPM-Solver++(3M)
    on the same T' levels (common's solver in x = z/alpha, ending in sigma_phi_0 = 0)."""
    g = torch.Generator().manual_seed(common.EVAL_SEED + 1)
    sigmas = common.append_zero(common.sigma_from_alpha_bar(alpha_bar_s[1:]).flip(0))
    alpha_T = float(alpha_bar_s[-1].sqrt())

    def step_noise(z):                               # the T' - 1 steps' noise, in the order of the steps: one copy
        it = iter(torch.stack([torch.randn(z.shape, generator=g) for _ in range(len(alpha_bar_s) - 2)]).to(z.device))
        return lambda x: next(it)

    return {"ddim": lambda z: sample_ddim(D, z, alpha_bar_s, clip),
            "alg2": lambda z: sample_ancestral(D, z, alpha_bar_s, clip=clip, noise=step_noise(z)),
            "dpm3m": lambda z: common.sample_dpmpp(D, z / alpha_T, sigmas)}


# ----------------------------------------------------------------------------------------------
# Training (boilerplate around Alg. 1: common.train_loop) and evaluation
# ----------------------------------------------------------------------------------------------

def train(args, pg, teacher, net, ema, data, alpha_bar_s, phi, out, teacher_sha256=None):
    """Alg. 1 (scratch_loss with --scratch) through common.train_loop for args.images images, resumable from
    out/checkpoint.pt. Returns the loop's totals (curve: window means [images, loss, loss_eps, loss_h])."""
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)      # each process its own data/noise
    path = out / "checkpoint.pt"
    resume = common.resume_from(path, "sfddm-training", args.resume, pg)
    settings = dict(phi=phi, mode="scratch" if args.scratch else args.init, hidden_weight=args.hidden_weight,
                    batch=args.batch, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip, ema=args.ema,
                    teacher_sha256=teacher_sha256)
    budget = common.Budget(args.images, "images", args.batch, args.lr, args.ckpt_every, clip=args.grad_clip,
                           schedule=common.warmup_lr(args.warmup, args.batch))
    loss = functools.partial(scratch_loss if args.scratch else sfddm_loss, alpha_bar_s=alpha_bar_s,
                             hidden_weight=args.hidden_weight)
    net.train()
    return common.train_loop(pg, loss, data, common.Denoiser(net), teacher, opt, budget, common.Run(
        path, "sfddm-training", settings, dict(net=net, ema=ema), gen, emas=[(ema, net, common.ema_beta(args.batch, args.ema))],
        resume=resume, desc="sfddm"))


def ceiling_rows(args, pg, folder, teacher, teacher_path, alpha_bar_s, phi, shape):
    """The teacher on phi with each of phi_samplers (the ceiling rows), into folder/<sampler>/, unless
    they are there for this teacher (sha256), phi, N and clipping."""
    key = dict(phi=phi, teacher_sha256=common.fingerprint(teacher_path), clip=not args.no_clip,
               fid_n=fid.fid_n(args.preset, args.fid_samples))
    def written():
        try:
            return all(all(json.loads((folder / s / "metrics.json").read_text()).get(k) == v for k, v in key.items())
                       for s in ("ddim", "alg2", "dpm3m"))
        except (OSError, ValueError):
            return False

    if pg.decide(written):                           # rank 0 reads, every process follows

        pg.log(f"ceiling rows (the teacher on phi) already in {folder}")
        return
    t0, ev = time.time(), common.Eval.of(args)
    for name, fn in phi_samplers(teacher, alpha_bar_s, not args.no_clip).items():
        fid.report(ev, pg, folder / name, teacher, teacher_path, fn, dict(
            method="teacher", variant=f"teacher-phi-{name}", nfe=len(phi) - 1, train_seconds=0, images_seen=0,
            teacher_steps=args.teacher_steps, subseq=args.subseq, **key), shape)
    pg.log(f"ceiling rows (the teacher on phi) in {(time.time() - t0) / 60:.1f} min: {folder}")


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

# The paper preset's cost, which a paper run on a machine without CUDA is refused with at once: FLOPs of
# one image of Alg. 1 at T' = 16 (teacher and student, hidden-map term), counted on the meta device by `python common.py flops`
# (tests/test_distributed.py counts them again), and the units in the preset's budget (bench_step's total).
PAPER_COST = dict(unit="images", units=12_800_000, flops_per_unit=4.977e10)


def bench_step(teacher, preset, device, batch=None):
    """One update of Alg. 1 at T' = 16 of T = 1024 (sfddm_loss with its hidden-map term, then
    common.optimizer_steps: the step, clipping and the EMA). Unit: images; budget: the preset's images."""
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    alpha_bar_s = student_alpha_bar(teacher_alpha_bar(1024), subsequence(1024, 16))
    net = common.student_from(teacher.net)
    ema = common.build_net(net.config).to(device).requires_grad_(False)
    D, opt = common.Denoiser(net), torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    pg, gen, shape = common.Dist(str(device)), torch.Generator().manual_seed(0), common.image_shape(net)
    emas = [(ema, net, common.ema_beta(batch, cfg["ema"]))]

    def step():
        x0 = torch.rand((batch, *shape), device=device) * 2 - 1
        with common.autocast(device):
            out = sfddm_loss(D, teacher, x0, gen, alpha_bar_s=alpha_bar_s)
        common.optimizer_steps(pg, out, opt, list(net.parameters()), cfg["grad_clip"], emas)

    return dict(step=step, unit="images", per_step=batch, total=cfg["images"], nets=[teacher.net, net, ema])


def main():
    args = parse_args()
    phi = subsequence(args.teacher_steps, args.nfe, args.subseq, args.concentration)
    pg = common.Dist(args.device, args.compile, args.channels_last)
    suffix = f"-nfe{args.nfe}" + ("-concentrated" if args.subseq == "concentrated" else "")
    kind = "scratch" if args.scratch else {"fresh": "", "teacher": "tinit"}[args.init]
    out = common.run_dir(args.out, args.dataset, "sfddm" + (f"-{kind}" if kind else "") + suffix)
    ev = common.Eval.of(args)
    fid.check_exports(ev, out / "ddim", out / "alg2")
    if args.nfe == 2:
        pg.log("warning: SFDDM is not meant for 2 steps (paper Sec. 5); expect blurry samples")
    alpha_bar_s = student_alpha_bar(teacher_alpha_bar(args.teacher_steps), phi)       # Eq. 9
    data, _ = common.load_dataset(args.dataset, args.data_dir)
    teacher, teacher_path = common.load_teacher(ev, pg)
    common.check_data_shape(data, teacher, args.dataset)
    if args.hidden_weight > 0:
        common.require_arch(teacher.net, ("fewstep",), "SFDDM's hidden-variable term (--hidden-weight > 0; "
                            "--hidden-weight 0 drops it) reads the U-Net's last hidden map")
    teacher_sha256 = common.fingerprint(teacher_path)          # saved in the checkpoints, checked on --resume
    shape = tuple(data.shape[1:])
    ceiling = out.parent / f"sfddm-teacher{suffix}"
    sigmas = [round(float(s), 4) for s in common.sigma_from_alpha_bar(alpha_bar_s[1:]).flip(0)]
    if args.init == "teacher" and teacher.net.config["dropout"] == 0 and pg.device.type != "cuda":
        pg.log(f"--init teacher: the student would compute exactly the teacher's eps at its T' levels, so the "
               f"loss and its gradient are 0 and training cannot move it (no dropout, fp32; tests pin this): "
               f"training skipped, its rows are the teacher sampled on phi = {phi}")
        ceiling_rows(args, pg, ceiling, teacher, teacher_path, alpha_bar_s, phi, shape)
        pg.close()
        return
    common.seed_all(args.seed)
    net = (common.student_from(teacher.net) if args.init == "teacher" else
           common.build_net(teacher.net.config).to(pg.device).train())
    ema = common.build_net(net.config).to(pg.device).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    pg.log(f"SFDDM{' from scratch (Eq. 15)' if args.scratch else ''}: T = {args.teacher_steps} -> T' = {args.nfe}, "
           f"phi = {phi}, student sigmas {sigmas}; {common.count_params(net) / 1e6:.2f} M params ({args.init} init), "
           f"{args.images:,} images, batch {args.batch}, lr {args.lr:g}, lambda_h {args.hidden_weight:g}, "
           f"{pg.world} process(es) on {pg.device}")
    run = train(args, pg, teacher, net, ema, data, alpha_bar_s, phi, out, teacher_sha256)
    stats = dict(images_seen=run["images"], train_seconds=run["seconds"], loss_start=run["loss_start"],
                 loss_end=run["loss_avg"])
    D_ema = common.Denoiser(ema.eval())
    if pg.main:
        common.save_checkpoint(out / "student.pt", "sfddm-student", net_config=ema.config, ema=ema.state_dict(),
                               phi=phi, alpha_bar=alpha_bar_s, teacher_steps=args.teacher_steps, dataset=args.dataset,
                               teacher_sha256=teacher_sha256, **stats)
        common.save_curves(out, [common.curve_of("scratch" if args.scratch else "sfddm", run)])
        pg.log(f"SFDDM: {stats['images_seen']:,} images in {stats['train_seconds'] / 60:.1f} min "
               f"({stats['images_seen'] / stats['train_seconds']:.0f} img/s), loss {stats['loss_start']:.4g} -> "
               f"{stats['loss_end']:.4g}; saved {out / 'student.pt'}, {out / 'loss.csv'}")

    # Evaluation: z = x'_T' ~ N(0, I) is the unit noise itself; both samplers, then the ceiling rows.
    samplers = phi_samplers(D_ema, alpha_bar_s, not args.no_clip)
    for name in ("ddim", "alg2"):
        info = dict(method="sfddm", variant="sfddm" + (f"-{kind}" if kind else "") + f"-{name}" +
                    ("-concentrated" if args.subseq == "concentrated" else ""), nfe=args.nfe, sampler=name,
                    teacher_steps=args.teacher_steps, subseq=args.subseq, phi=phi, student_sigmas=sigmas,
                    init=args.init, scratch=args.scratch, hidden_weight=args.hidden_weight, lr=args.lr,
                    batch=args.batch, clip=not args.no_clip, **stats)
        fid.report(ev, pg, out / name, teacher, teacher_path, samplers[name], info, shape, student=D_ema)
    ceiling_rows(args, pg, ceiling, teacher, teacher_path, alpha_bar_s, phi, shape)
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
