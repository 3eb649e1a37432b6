"""pd.py: Progressive Distillation (Salimans & Ho, ICLR 2022), one file: halve a diffusion sampler's DDIM
steps, stage by stage.

Paper: Tim Salimans, Jonathan Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022, arXiv:2202.00512 (Algorithm 2). Authors' code: google-research/google-research,
diffusion_distillation/ (dpm.py, training_losses; config/cifar_distill.py).

What is implemented (../shared/specs/METHODS.md, section 1):
  - The cosine VP schedule in continuous t in [0, 1], in the paper's notation: z_t = alpha_t*x + sigma_t*eps,
    alpha_t^2 + sigma_t^2 = 1, log-SNR lambda_t = -2 ln tan(a t + b) (common.cosine_alpha_sigma) from
    lambda_max = 20 at t = 0 to LOGSNR_MIN = -2 ln 80 at t = 1 (see the deviations).
    Here sigma_t is the paper's VP noise level; the EDM noise level of the same point is sigma_t/alpha_t.
    Every network (the shared EDM teacher, each student) is called through the VP adapter
    common.vp_predict: x_hat(z_t) = D(z_t/alpha_t, sigma_t/alpha_t).
  - Halving stages (Alg. 2, outer loop): the original teacher is sampled with --start-steps DDIM
    steps; stage k distils a 2N-step teacher into an N-step student, N = start/2, start/4, ..., --nfe.
    Each stage starts the student as a copy of its teacher with a fresh optimizer, and the finished
    student becomes the next stage's teacher.
  - Per update (Alg. 2, inner loop): i ~ U{0..N-1}, t = (i+1)/N, z_t = alpha_t*x + sigma_t*eps; two
    teacher DDIM steps t -> t' = t - 0.5/N -> t'' = t - 1/N; the target x~ is the x_hat that makes one
    student DDIM step t -> t'' land on the teacher's z_t''; at i = 0 (t'' = 0) it is the teacher's
    last x_hat (authors' code). Loss max(SNR_t, 1)*|x_hat_theta(z_t) - x~|^2 ("truncated SNR", Sec. 4).
  - Adam, lr annealed linearly to 0 over each stage, gradient clipping at norm 1, no EMA, dropout off in
    the students ("same as teacher but with 0 dropout"), training images flipped left-right at random
    (--xflip, on by default: randflip = True) - all the authors' config/cifar_distill.py; stages whose
    student has <= --later-steps steps may train --later-factor times longer.
  - Sampling: DDIM on the student's N-step grid from z_1 = eps, x_hat clipped to [-1, 1], the last
    step returns x_hat (authors' ddim_step). NFE = N.
  - Every finished stage is kept as runs/<dataset>/pd-<preset>/student-<N>steps.pt (cfd.py starts from
    the 8-step one: load_pd_student below); checkpoint.pt holds the stage in progress, so --resume
    continues at the right stage and update. A finished chain is reused: `--nfe 2 --resume` after a
    4-step run trains only the 4 -> 2 stage. Each evaluated NFE gets its own folder in the chain's
    (pd-<preset>/nfe<N>/: metrics.json, samples.png), so the 4- and 2-step results both stay.

Deviations from the paper, and why:
  - The teacher is fewstep's shared EDM denoiser, not the paper's cosine-trained v-prediction U-Net,
    so that all methods share one teacher (METHODS.md 0); students keep its EDM parametrisation
    (the paper's student predicts x or v; PD works with any parametrisation whose x_hat is defined).
  - The lab preset starts from 32 steps, not 8192 (paper) or 1024 (SFERD, CFD), and trains each stage
    for a few hundred updates at a larger learning rate than 5e-5: a 2-core CPU affords ~10 minutes.
  - The schedule ends at lambda = -2 ln 80 (EDM sigma 80 at t = 1), not at the authors' logsnr_min = -20
    (sigma = e^10 = 2.2e4), in every preset: the shared EDM teacher was trained on ln sigma ~ N(-1.2, 1.2^2)
    and samples from sigma_max = 80, and at 2.2e4 its c_noise = ln(sigma)/4 lies 9 standard deviations
    outside that range; every DDIM chain and every i = N-1 target starts at t = 1. Measured on the lab
    teacher, its own DDIM on the cosine grid over the 500 evaluation noises (scratch script, not in the
    repo): the first x_hat at sigma 2.2e4 differs from the one at 80 by RMS 0.071 (x_hat's own RMS 0.71);
    32 steps: FID-500 65.34 with -20, 65.79 truncated, but teacher_rms 0.106 against 0.055 (the
    truncated chain follows the teacher's ODE from 80); 4 steps: FID-500 78.38 against 74.58 (teacher_rms
    0.296, 0.244); 1 step: teacher_rms 0.467, 0.434. The grid then also moves: t = 31/32 is sigma 16.3,
    not 20.3.

Run:
  python pd.py --dataset fashion --nfe 4                        # CPU lab preset: 32 -> 16 -> 8 -> 4 steps
  python pd.py --dataset fashion --nfe 2 --resume               # continue the chain by one stage
  python pd.py --dataset cifar10 --preset paper --nfe 1         # CUDA, paper: 8192 -> ... -> 1 step
  python pd.py --dataset cifar10 --preset paper --start-steps 1024 --nfe 4   # the SFERD/CFD baseline
  torchrun --nproc_per_node=2 pd.py --preset smoke              # two processes (gloo on CPU)
"""
import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fid
from common import (RUNS, Denoiser, build_net, Dist, UserError, autocast, check_data_shape, check_exports,
                    check_finite, common_parser, cosine_alpha_sigma, dataset_slug, fingerprint, first_paragraph,
                    learning_rate, load_checkpoint, load_dataset, load_state, load_teacher, main_guard, random_batch,
                    run_dir, save_checkpoint, seed_all, student_from, to_float, vp_predict)

# ----------------------------------------------------------------------------------------------
# Arguments and presets
# ----------------------------------------------------------------------------------------------

PRESETS = {
    # start_steps: DDIM steps of the original teacher; iters: updates per stage; batch: global batch;
    # lr: Adam lr at the start of each stage; later_factor: update multiplier for stages with
    # <= later_steps student steps; ckpt_every: updates between checkpoints.
    "smoke": dict(start_steps=8, iters=3, batch=8, lr=1e-4, later_factor=1.0, later_steps=2, ckpt_every=2),
    "lab": dict(start_steps=32, iters=300, batch=32, lr=2e-4, later_factor=1.0, later_steps=2, ckpt_every=100),
    # Authors' CIFAR-10 config: 8192 start steps, 50k updates of batch 128 per stage, Adam 5e-5 (linear
    # anneal), clip 1, no EMA; the paper notes the 2- and 1-step stages gain from twice the updates.
    "paper": dict(start_steps=8192, iters=50_000, batch=128, lr=5e-5, later_factor=2.0, later_steps=2, ckpt_every=5_000),
}


# The cosine schedule's lambda at t = 1: -2 ln 80, so that t = 1 is EDM sigma = exp(-lambda/2) = 80, the shared
# teacher's sigma_max (the authors' -20 would put t = 1 at sigma 2.2e4, outside what an EDM teacher saw; see the header).
LOGSNR_MIN = -2 * math.log(80.0)


def parse_args(argv=None):
    p = common_parser(first_paragraph(__doc__), nfe_default=4,
                      nfe_help="N, the final student's DDIM steps (a power of two, at most --start-steps)")
    p.add_argument("--start-steps", type=int, default=None,
                   help="DDIM steps of the original teacher; the first student has half as many "
                        "(paper 8192, SFERD/CFD 1024; default: the preset's, lab 32)")
    p.add_argument("--iters", type=int, default=None, help="updates per halving stage (paper 50k; default: the preset's)")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="Adam learning rate gamma at the start of each stage, annealed linearly to 0 "
                        "(paper 5e-5; default: the preset's)")
    p.add_argument("--later-factor", type=float, default=None,
                   help="stages whose student has <= --later-steps steps run this many times the updates "
                        "(paper 2; default: the preset's)")
    p.add_argument("--later-steps", type=int, default=None, help="see --later-factor (default 2)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (paper 1.0)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=True, help="flip each training image "
                   "left-right with probability 1/2 (the authors' randflip = True; default on)")
    p.add_argument("--ckpt-every", type=int, default=None, help="updates between checkpoints (default: the preset's)")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    for key in ("start_steps", "iters", "lr", "later_factor", "later_steps", "ckpt_every"):
        if getattr(args, key) is None:
            setattr(args, key, cfg[key])
    args.batch = args.batch_size or cfg["batch"]           # training batch; --batch-size also sets the eval batch
    return args


def is_power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


def stage_steps(nfe, start_steps):
    """Student step counts of the halving stages: start/2, start/4, ..., nfe (empty if nfe = start)."""
    if not is_power_of_two(start_steps):
        raise UserError(f"--start-steps {start_steps}: must be a power of two (halving stages)")
    if not is_power_of_two(nfe) or nfe > start_steps:
        raise UserError(f"--nfe {nfe}: progressive distillation halves {start_steps} steps, so --nfe must be "
                        f"a power of two no larger than {start_steps} (1, 2, 4, ...)")
    steps, N = [], start_steps
    while N > nfe:
        N //= 2
        steps.append(N)
    return steps


# ----------------------------------------------------------------------------------------------
# The method: cosine schedule, DDIM, the two-step teacher target, the truncated-SNR loss
# ----------------------------------------------------------------------------------------------

def alpha_sigma(t, like):
    """alpha_t, sigma_t of the cosine schedule (ending at the teacher's sigma_max: LOGSNR_MIN) as
    B x 1 x 1 x 1 float tensors on like's device."""
    alpha, sigma = cosine_alpha_sigma(t, logsnr_min=LOGSNR_MIN)
    shape = (-1, 1, 1, 1)
    return alpha.reshape(shape).to(like.device, like.dtype), sigma.reshape(shape).to(like.device, like.dtype)


def ddim_step(z_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    """DDIM (eta = 0) from t to s < t, Alg. 2: z_s = alpha_s*x_hat + (sigma_s/sigma_t)*(z_t - alpha_t*x_hat)."""
    return alpha_s * x_hat + (sigma_s / sigma_t) * (z_t - alpha_t * x_hat)


@torch.no_grad()
def teacher_target(teacher, z_t, t, N):
    """Alg. 2: two DDIM steps of the 2N-step teacher, t -> t' = t - 0.5/N -> t'' = t - 1/N, then the
    x~ for which one N-step student DDIM step t -> t'' lands on the teacher's z_t'':
        x~ = (z_t'' - (sigma_t''/sigma_t)*z_t) / (alpha_t'' - (sigma_t''/sigma_t)*alpha_t).
    Where t'' = 0 the student's last step returns x_hat itself, so x~ = the teacher's last x_hat.
    t: per-sample tensor (float64). Returns (x~, z_t'')."""
    t_p, t_pp = t - 0.5 / N, t - 1.0 / N                    # t' and t''
    alpha_t, sigma_t = alpha_sigma(t, z_t)
    alpha_p, sigma_p = alpha_sigma(t_p, z_t)
    alpha_pp, sigma_pp = alpha_sigma(t_pp, z_t)
    x_hat = vp_predict(teacher, z_t, alpha_t, sigma_t)[0]
    z_p = ddim_step(z_t, x_hat, alpha_t, sigma_t, alpha_p, sigma_p)          # teacher step t -> t'
    x_hat_p = vp_predict(teacher, z_p, alpha_p, sigma_p)[0]
    z_pp = ddim_step(z_p, x_hat_p, alpha_p, sigma_p, alpha_pp, sigma_pp)     # teacher step t' -> t''
    ratio = sigma_pp / sigma_t
    x_tilde = (z_pp - ratio * z_t) / (alpha_pp - ratio * alpha_t)            # teacher x_hat target (Alg. 2)
    last = (t_pp <= 0).reshape(-1, 1, 1, 1).to(z_t.device)
    return torch.where(last, x_hat_p, x_tilde), z_pp


def truncated_snr_weight(alpha_t, sigma_t):
    """w(lambda_t) = max(SNR_t, 1), SNR = alpha^2/sigma^2 (Sec. 4 "truncated SNR" weighting)."""
    return (alpha_t**2 / sigma_t**2).clamp(min=1.0)


def pd_loss(student, teacher, x, eps, i, N):
    """One batch of Alg. 2's inner loop: returns the mean of w(lambda_t)*|x~ - x_hat_theta(z_t)|^2
    (per-pixel mean, as the authors' meanflat)."""
    t = (i.double() + 1) / N                                 # t = (i+1)/N, i ~ U{0..N-1}
    alpha_t, sigma_t = alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    x_tilde, _ = teacher_target(teacher, z_t, t, N)
    x_hat = vp_predict(student, z_t, alpha_t, sigma_t)[0]
    mse = ((x_hat - x_tilde) ** 2).mean(dim=(1, 2, 3))
    return (truncated_snr_weight(alpha_t, sigma_t).flatten() * mse).mean()


@torch.no_grad()
def sample_ddim(D, eps, N, clip=True):
    """DDIM on the N-step grid t_k = k/N from z_1 = eps (the paper's start; alpha_1 = 1/sqrt(1 + 80^2), not 0,
    and the signal it would carry is dropped, as EDM's x = 80*eps drops it);
    x_hat clipped to [-1, 1] and eps_hat recomputed from it (authors' _run_model); the last step
    returns x_hat. N network calls."""
    z = eps
    for k in range(N, 0, -1):
        t, s = torch.tensor([k / N], dtype=torch.float64), torch.tensor([(k - 1) / N], dtype=torch.float64)
        alpha_t, sigma_t = alpha_sigma(t, z)
        x_hat = vp_predict(D, z, alpha_t, sigma_t)[0]
        if clip:
            x_hat = x_hat.clamp(-1, 1)
        if k == 1:
            return x_hat
        alpha_s, sigma_s = alpha_sigma(s, z)
        z = ddim_step(z, x_hat, alpha_t, sigma_t, alpha_s, sigma_s)
    return z


def random_xflip(x, gen):
    """Each image flipped left-right with probability 1/2 (the authors' randflip); draws from gen."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).reshape(-1, 1, 1, 1).to(x.device)
    return torch.where(flip, x.flip(-1), x)


def make_student(teacher):
    """theta <- eta (Alg. 2): a trainable copy of the teacher's U-Net, dropout off (authors' config)."""
    net = student_from(teacher.net)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return Denoiser(net)


# ----------------------------------------------------------------------------------------------
# Stage files: the chain of students (also what cfd.py reuses)
# ----------------------------------------------------------------------------------------------

def pd_dir(args):
    """Where a PD chain lives: --out, else runs/<dataset>/pd-<preset>."""
    return run_dir(args, f"pd-{args.preset}")


def student_path(folder, N):
    return Path(folder) / f"student-{N}steps.pt"


def load_pd_student(args, steps, folder=None, device="cpu", kind="pd"):
    """The frozen N-step student Denoiser of a finished stage (cfd.py starts from steps = 8), from
    folder (default runs/<dataset>/pd-<preset>). Returns (denoiser, path, checkpoint)."""
    path = student_path(folder or RUNS / dataset_slug(args.dataset) / f"pd-{args.preset}", steps)
    if not path.exists():
        raise UserError(f"no {steps}-step PD student at {path}: run `python pd.py --dataset {args.dataset} "
                        f"--preset {args.preset} --nfe {steps}` first")
    ck = load_checkpoint(path, f"{kind}-student")
    D = Denoiser(build_net(ck["net_config"]))
    load_state(D.net, ck["net"], path)
    return D.to(device).eval().requires_grad_(False), path, ck


def check_chain(ck, path, chain):
    """Refuse to continue a chain from a file written with other settings (chain: what identifies it).
    A *_sha256 fingerprint missing from a file written before fingerprints is not checked."""
    changed = [f"{k} {ck.get(k)!r} (now {v!r})" for k, v in chain.items()
               if ck.get(k) != v and not (k.endswith("_sha256") and k not in ck)]
    if changed:
        raise UserError(f"{path} belongs to another chain: {', '.join(changed)}; use another --out or drop --resume")


# ----------------------------------------------------------------------------------------------
# Training: one halving stage, and the chain of stages
# ----------------------------------------------------------------------------------------------

def linear_anneal(k, iters):
    return 1 - k / iters


def stage_budget(args, N):
    """Updates, lr and batch of the stage that ends at N steps (saved with it; a resumed chain must match)."""
    return dict(iters=round(args.iters * (args.later_factor if N <= args.later_steps else 1)), lr=args.lr, batch=args.batch)


def train_stage(args, pg, data, teacher, N, gen, state, out, chain, loss_fn=pd_loss, lr_factor=linear_anneal, kind="pd",
                speed=lambda N: 2):
    """Distil the frozen 2N-step teacher into an N-step student (Alg. 2, inner loop). state holds
    the run totals (images, seconds) and, when resuming mid-stage, the checkpoint to continue from.
    chain: settings saved with every file of the chain (checked on resume). cfd.py passes its own
    loss_fn(student, teacher, x, eps, i, N), lr schedule and file kind, sferd.py its speed(N) (teacher
    steps per student step; 2 in PD; only for the log); the rest is the same."""
    stage = f"{speed(N) * N} -> {N} steps"
    student = make_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)                 # optimizer reset every stage
    iters = stage_budget(args, N)["iters"]
    k = 0
    ck = state.pop("ckpt", None)
    if ck is not None:
        load_state(student.net, ck["net"], out / "checkpoint.pt")
        opt.load_state_dict(ck["opt"])
        k = ck["iter"]
        pg.log(f"resuming the {stage} {kind} stage at update {k:,} of {iters:,}")
    pg.broadcast(student)
    local = pg.batch(args.batch)
    t0 = time.time() - state["seconds"]
    bar = tqdm(total=iters, initial=k, unit="it", disable=not pg.main, desc=f"{kind} {stage}")
    loss = torch.zeros(())
    while k < iters:
        x = to_float(random_batch(data, local, gen)).to(pg.device)
        if getattr(args, "xflip", False):                    # sferd.py's runs have no --xflip: no flips
            x = random_xflip(x, gen)
        eps = torch.randn(x.shape, generator=gen).to(pg.device)
        i = torch.randint(N, (local,), generator=gen)
        with autocast(pg.device):
            loss = loss_fn(student, teacher, x, eps, i, N)
        check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pg.sync_grads(student.parameters())
        for group in opt.param_groups:                       # PD: linear anneal to 0 over the stage
            group["lr"] = args.lr * lr_factor(k, iters)
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        opt.step()
        k += 1
        state["images"] += args.batch
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4g}")
        if k % args.ckpt_every == 0 and k < iters:
            rng = pg.gather_state(gen.get_state())
            if pg.main:
                save_checkpoint(out / "checkpoint.pt", f"{kind}-training", steps=N, iter=k, net=student.net.state_dict(),
                                opt=opt.state_dict(), rng=rng, images=state["images"], seconds=time.time() - t0,
                                **stage_budget(args, N), **chain)
    bar.close()
    state["seconds"] = time.time() - t0
    pg.check_in_sync(student)
    rng = pg.gather_state(gen.get_state())
    path = student_path(out, N)
    if pg.main:
        save_checkpoint(path, f"{kind}-student", net_config=student.net.config, net=student.net.state_dict(), steps=N,
                        rng=rng, images=state["images"], seconds=state["seconds"], dataset=args.dataset,
                        preset=args.preset, **stage_budget(args, N), **chain)
        pg.log(f"stage {stage} ({kind}): {iters:,} updates of {args.batch}, last loss {loss.item():.4g}, "
               f"{state['images']:,} images and {state['seconds'] / 60:.1f} min so far; saved {path}")
    pg.barrier()
    return student.eval().requires_grad_(False)


def run_chain(args, pg, data, teacher, stages, out, chain, gen, state=None, reuse=None, wrap=lambda D: D, **stage_kw):
    """Alg. 2's outer loop: each stage's student becomes the next stage's teacher (eta <- theta).
    Finished stage files in out are reused (reuse, default --resume) and a stage in progress
    (out/checkpoint.pt) continues at its update, so an interrupted chain ends where a straight one
    does. wrap(teacher) is what each stage distils from (sferd.py: the attention-guided teacher).
    Returns (the last student, the unwrapped teacher of its stage, state: images and seconds)."""
    kind = stage_kw.get("kind", "pd")
    state = dict(images=0, seconds=0.0) if state is None else state
    reuse = args.resume if reuse is None else reuse
    ck_path, prev = out / "checkpoint.pt", teacher
    for N in stages:
        prev = teacher
        if reuse and student_path(out, N).exists():                          # a finished stage: reuse it
            teacher, done, ck = load_pd_student(args, N, out, pg.device, kind)
            check_chain(ck, done, {**chain, **stage_budget(args, N)})
            state.update(images=ck["images"], seconds=ck["seconds"])
            pg.restore_state(gen, ck["rng"])
            pg.log(f"reusing the {N}-step {kind} student {done}")
            continue
        ck = load_checkpoint(ck_path, f"{kind}-training") if args.resume and ck_path.exists() else None
        if ck is not None and ck["steps"] == N:                               # the stage in progress
            check_chain(ck, ck_path, {**chain, **stage_budget(args, N)})
            state.update(images=ck["images"], seconds=ck["seconds"], ckpt=ck)
            pg.restore_state(gen, ck["rng"])
        teacher = train_stage(args, pg, data, wrap(teacher), N, gen, state, out, chain, **stage_kw)
    return teacher, prev, state


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

def bench_step(teacher, preset, device, batch=None):
    """One update of a halving stage (every stage costs the same: two teacher calls, one student call
    with its backward pass). Unit: images; budget: the preset's whole chain down to 1 step."""
    from common import image_shape
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    student = make_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    stages = stage_steps(1, cfg["start_steps"])
    updates = sum(round(cfg["iters"] * (cfg["later_factor"] if N <= cfg["later_steps"] else 1)) for N in stages)
    shape, N = image_shape(student.net), stages[0]

    def step():
        x = torch.rand((batch, *shape), device=device) * 2 - 1
        eps, i = torch.randn((batch, *shape), device=device), torch.randint(N, (batch,))
        with autocast(device):
            loss = pd_loss(student, teacher, x, eps, i, N)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    return dict(step=step, unit="images", per_step=batch, total=updates * cfg["batch"], nets=[teacher.net, student.net])


def main(argv=None):
    args = parse_args(argv)
    stages = stage_steps(args.nfe, args.start_steps)
    pg = Dist(args.device)
    out = pd_dir(args)
    check_exports(args, out / f"nfe{args.nfe}")
    data, _ = load_dataset(args.dataset, args.data_dir)
    seed_all(args.seed)
    teacher, teacher_path = load_teacher(args, pg)
    check_data_shape(data, teacher, args.dataset)
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)          # each process its own data/noise
    pg.log(f"pd: {args.dataset}, preset {args.preset}, {args.start_steps} -> {' -> '.join(map(str, stages)) or 'no stage'} "
           f"steps, {args.iters:,} updates of {args.batch} per stage, lr {args.lr:g}, {pg.world} process(es) on {pg.device}")
    chain = dict(start_steps=args.start_steps, teacher_sha256=fingerprint(teacher_path), xflip=args.xflip)   # by content
    student, _, state = run_chain(args, pg, data, teacher, stages, out, chain, gen)   # the teacher itself if no stage
    info = dict(method="pd", variant="pd", nfe=args.nfe, train_seconds=state["seconds"], images_seen=state["images"],
                start_steps=args.start_steps, stages=stages, iters_per_stage=args.iters, lr=args.lr,
                batch=args.batch, xflip=args.xflip, sampler="DDIM, x_hat clipped to [-1, 1]")
    # The report compares with the original teacher's solvers.
    fid.report(args, pg, out / f"nfe{args.nfe}", teacher, teacher_path, lambda eps: sample_ddim(student, eps, args.nfe),
               info, data.shape[1:])
    pg.close()


if __name__ == "__main__":
    main_guard(main)
