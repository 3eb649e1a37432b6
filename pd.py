"""pd.py: Progressive Distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
Models", ICLR 2022, arXiv:2202.00512, Algorithm 2): halve a DDIM sampler's steps, stage by stage.

  python pd.py --dataset fashion --nfe 4                        # CPU lab preset: 32 -> 16 -> 8 -> 4 steps
  python pd.py --dataset fashion --nfe 2 --resume               # continue the chain by one stage
  python pd.py --dataset cifar10 --preset paper --nfe 1         # CUDA, paper: 8192 -> ... -> 1 step
  python pd.py --dataset cifar10 --preset paper --start-steps 1024 --nfe 4   # the SFERD/CFD baseline
  torchrun --nproc_per_node=2 pd.py --preset smoke              # two processes (gloo on CPU)

What is implemented (authors' code: google-research diffusion_distillation/):
  - The cosine VP schedule in continuous t in [0, 1]: z_t = alpha_t*x + sigma_t*eps, lambda_t = -2 ln tan(a t + b);
    every network is called through common.vp_predict: x_hat(z_t) = D(z_t/alpha_t, sigma_t/alpha_t).
  - Alg. 2's inner loop (pd_loss): i ~ U{0..N-1}, t = (i+1)/N, two DDIM steps of the 2N-step teacher t -> t - 0.5/N
    -> t'' = t - 1/N, the target x~ that makes one student step land on the teacher's z_t'' (at t'' = 0: the teacher's
    last x_hat, authors' code), loss max(SNR_t, 1)*|x_hat_theta(z_t) - x~|^2 ("truncated SNR", Sec. 4).
  - Alg. 2's outer loop (distil): each student starts as a copy of its teacher with a fresh Adam and teaches the
    next stage. The authors' config/cifar_distill.py: lr linear to 0 over each stage, clip 1, no EMA, student dropout
    0, images flipped left-right at random (--xflip); stages with <= --later-steps steps may train --later-factor longer.
  - Sampling: DDIM on the N-step grid from z_1 = eps, x_hat clipped to [-1, 1], the last step returns x_hat. NFE = N.
  - Stage files runs/<dataset>/pd-<preset>/student-<N>steps.pt (train_stage): --resume (and cfd.py) reuses a
    finished one and continues an unfinished one; each NFE is evaluated into nfe<N>/ there. distil is the one
    halving loop: cfd.py and sferd.py run it with their own loss.

Deviations (why):
  - The teacher is fewstep's shared EDM denoiser (common.py's Denoiser), not a v-prediction U-Net; the students keep its
    parametrisation (PD needs only x_hat).
  - The schedule ends at lambda = -2 ln 80 (EDM sigma 80 at t = 1, the teacher's sigma_max), not the authors'
    logsnr_min = -20 (sigma 2.2e4, 9 standard deviations outside the shared teacher's training noise; see README).
  - Lab: 32 start steps (paper 8192, SFERD/CFD 1024) and a few hundred updates per stage at a larger lr (a 2-core CPU).
"""
import argparse
import math
from pathlib import Path

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import torch

import fid

PRESETS = {
    # start_steps: DDIM steps of the original teacher; iters: updates per stage; batch: global batch; lr: Adam lr at
    # the start of each stage; later_factor: update multiplier for stages of <= later_steps steps; ckpt_every: updates.
    "smoke": dict(start_steps=8, iters=3, batch=8, lr=1e-4, later_factor=1.0, later_steps=2, ckpt_every=2),
    "lab": dict(start_steps=32, iters=300, batch=32, lr=2e-4, later_factor=1.0, later_steps=2, ckpt_every=100),
    # Authors' CIFAR-10 config: 8192 start steps, 50k updates of batch 128 per stage, Adam 5e-5 (linear
    # anneal), clip 1, no EMA; the paper notes the 2- and 1-step stages gain from twice the updates.
    "paper": dict(start_steps=8192, iters=50_000, batch=128, lr=5e-5, later_factor=2.0, later_steps=2, ckpt_every=5_000),
}
# The cosine schedule's lambda at t = 1: -2 ln 80, so that t = 1 is EDM sigma = exp(-lambda/2) = 80, the shared
# teacher's sigma_max (the authors' -20 would put t = 1 at sigma 2.2e4, outside what an EDM teacher saw; see the header).
LOGSNR_MIN = -2 * math.log(common.SIGMA_MAX)


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4, presets=PRESETS, paper_cost=PAPER_COST,
                             nfe_help="N, the final student's DDIM steps (a power of two, at most --start-steps)")
    common.preset_flag(p, "start_steps", int, "DDIM steps of the original teacher; the first student has half as "
                       "many (SFERD/CFD: 1024)")
    common.preset_flag(p, "iters", int, "updates per halving stage")
    common.preset_flag(p, "lr", common.learning_rate, "Adam learning rate gamma at the start of each stage, annealed "
                       "linearly to 0")
    common.preset_flag(p, "later_factor", float, "stages whose student has <= --later-steps steps run this many times "
                       "the updates")
    common.preset_flag(p, "later_steps", int, "see --later-factor")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (paper 1.0)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=True, help="flip each training image "
                   "left-right with probability 1/2 (the authors' randflip = True; default on)")
    common.preset_flag(p, "ckpt_every", int, "updates between checkpoints")
    return p.parse_args(argv)


def is_power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


def stage_steps(nfe, start_steps):
    """Student step counts of the halving stages: start/2, start/4, ..., nfe (empty if nfe = start)."""
    if not is_power_of_two(start_steps):
        raise common.UserError(f"--start-steps {start_steps}: must be a power of two (halving stages)")
    if not is_power_of_two(nfe) or nfe > start_steps:
        raise common.UserError(f"--nfe {nfe}: progressive distillation halves {start_steps} steps, so --nfe must be "
                               f"a power of two no larger than {start_steps} (1, 2, 4, ...)")
    steps, N = [], start_steps
    while N > nfe:
        N //= 2
        steps.append(N)
    return steps


# ----------------------------------------------------------------------------------------------
# The method: cosine schedule, DDIM, the two-step teacher target, Alg. 2
# ----------------------------------------------------------------------------------------------

def alpha_sigma(t, like):
    """alpha_t, sigma_t of the cosine schedule (ending at the teacher's sigma_max: LOGSNR_MIN) as
    B x 1 x 1 x 1 float tensors on like's device."""
    return alpha_sigma_steps([t], like)[0]


def alpha_sigma_steps(ts, like):
    """alpha_sigma of each time in ts (each a number or a per-sample tensor, on the host), computed on the host
    and moved to like's device in one copy: a sampler's or a loss's steps copy nothing in their loop."""
    pairs = [common.cosine_alpha_sigma(t, logsnr_min=LOGSNR_MIN) for t in ts]
    flat = torch.cat([v.reshape(-1) for pair in pairs for v in pair]).to(like.dtype).to(like.device)   # cast on the host
    sizes = [v.numel() for pair in pairs for v in pair]
    parts = [v.reshape(-1, 1, 1, 1) for v in flat.split(sizes)]
    return list(zip(parts[0::2], parts[1::2]))


def ddim_step(z_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    """DDIM (eta = 0) from t to s < t, Alg. 2: z_s = alpha_s*x_hat + (sigma_s/sigma_t)*(z_t - alpha_t*x_hat)."""
    return alpha_s * x_hat + (sigma_s / sigma_t) * (z_t - alpha_t * x_hat)


@torch.no_grad()
def teacher_target(teacher, z_t, t, N, n=2):
    """Alg. 2: n = 2 DDIM steps of the nN-step teacher, t -> t' = t - 1/(2N) -> t'' = t - 1/N, then the
    x~ for which one N-step student DDIM step t -> t'' lands on the teacher's z_t''. Where t'' = 0 the
    student's last step returns x_hat itself, so x~ = the teacher's last x_hat. (n > 2: sferd.py's speeds.)
    t: per-sample tensor (float64). Returns (x~, z_t'')."""
    steps = alpha_sigma_steps([t] + [t - j / (n * N) for j in range(1, n + 1)], z_t)
    (alpha_t, sigma_t), z = steps[0], z_t
    alpha, sigma = alpha_t, sigma_t
    for j in range(1, n + 1):                                    # the teacher's steps t -> t' -> t''
        alpha_next, sigma_next = steps[j]
        x_hat = common.vp_predict(teacher, z, alpha, sigma)[0]
        z = ddim_step(z, x_hat, alpha, sigma, alpha_next, sigma_next)
        alpha, sigma = alpha_next, sigma_next
    ratio = sigma / sigma_t
    x_tilde = (z - ratio * z_t) / (alpha - ratio * alpha_t)      # teacher x_hat target (Alg. 2)
    last = (t - 1 / N <= 0).reshape(-1, 1, 1, 1).to(z_t.device)
    return torch.where(last, x_hat, x_tilde), z


def truncated_snr_weight(alpha_t, sigma_t):
    """w(lambda_t) = max(SNR_t, 1), SNR = alpha^2/sigma^2 (Sec. 4 "truncated SNR" weighting)."""
    return (alpha_t**2 / sigma_t**2).clamp(min=1.0)


def random_xflip(x, gen):
    """Each image flipped left-right with probability 1/2 (the authors' randflip); draws from gen."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).reshape(-1, 1, 1, 1).to(x.device)
    return torch.where(flip, x.flip(-1), x)


def pd_loss(student, teacher, x, gen, N, xflip=False, n=2):
    """Alg. 2's inner loop for one batch x ~ D (common.train_loop draws it) and an N-step student: the mean of
    w(lambda_t)*|x~ - x_hat_theta(z_t)|^2 (per-pixel mean, as the authors' meanflat). Draws from gen: the flips
    (xflip), eps, then i. n: the teacher's steps per student step (PD: 2; sferd.py's speeds)."""
    if xflip:
        x = random_xflip(x, gen)                                 # the authors' randflip
    eps = torch.randn(x.shape, generator=gen).to(x.device)      # eps ~ N(0, I)
    i = torch.randint(N, (len(x),), generator=gen)               # t = i/N, i ~ Cat[1..N]: here i+1
    t = (i.double() + 1) / N
    alpha_t, sigma_t = alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps                            # z_t = alpha_t*x + sigma_t*eps
    x_tilde, _ = teacher_target(teacher, z_t, t, N, n)           # n (PD: 2) DDIM steps of the teacher, then x~
    x_hat = common.vp_predict(student, z_t, alpha_t, sigma_t)[0]
    mse = ((x_hat - x_tilde) ** 2).mean(dim=(1, 2, 3))
    return (truncated_snr_weight(alpha_t, sigma_t).flatten() * mse).mean()   # L = w(lambda_t)*|x~ - x_hat_theta(z_t)|^2


def linear_anneal(lr, done, total):
    """The authors' lr schedule: linear from lr to 0 over each stage."""
    return lr * (1 - done / total)


def make_student(teacher):
    """theta <- eta (Alg. 2): a trainable copy of the teacher's U-Net, dropout off (authors' config)."""
    net = common.student_from(teacher.net)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return common.Denoiser(net)


@torch.no_grad()
def sample_ddim(D, eps, N, clip=True):
    """DDIM on the N-step grid t_k = k/N from z_1 = eps (the paper's start; alpha_1 = 1/sqrt(1 + 80^2), not 0,
    and the signal it would carry is dropped, as EDM's x = 80*eps drops it);
    x_hat clipped to [-1, 1] and eps_hat recomputed from it (authors' _run_model); the last step
    returns x_hat. N network calls."""
    z, times = eps, [torch.tensor([k / N], dtype=torch.float64) for k in range(N, -1, -1)]
    steps = dict(zip(range(N, -1, -1), alpha_sigma_steps(times, z)))          # alpha, sigma at t = k/N
    for k in range(N, 0, -1):
        alpha_t, sigma_t = steps[k]
        x_hat = common.vp_predict(D, z, alpha_t, sigma_t)[0]
        if clip:
            x_hat = x_hat.clamp(-1, 1)
        if k == 1:
            return x_hat
        alpha_s, sigma_s = steps[k - 1]
        z = ddim_step(z, x_hat, alpha_t, sigma_t, alpha_s, sigma_s)
    return z


# ----------------------------------------------------------------------------------------------
# Alg. 2's outer loop: the halving chain, pd.py's and the one cfd.py and sferd.py run with their own loss
# ----------------------------------------------------------------------------------------------

def stage_path(folder, N):
    """The file of the stage that ends at an N-step student."""
    return Path(folder) / f"student-{N}steps.pt"


def stage_budget(args, N, schedule):
    """train_loop's budget of the stage that ends at N steps: --iters updates (times --later-factor where
    N <= --later-steps) of the batch, the lr under schedule, args.grad_clip and args.ckpt_every."""
    return common.Budget(round(args.iters * (args.later_factor if N <= args.later_steps else 1)), "updates", args.batch,
                         args.lr, args.ckpt_every, schedule=schedule, clip=args.grad_clip)


def train_stage(pg, loss, budget, student, path, kind, settings, gen, reuse, resume, totals, data, teacher, desc):
    """One stage of a chain: common.train_loop on student (saved as "net"), a fresh Adam at the budget's lr (PD's),
    with the stage file path as its checkpoint. A finished file is read back instead of trained when reuse,
    an unfinished one continued when resume, else the stage starts over; a file read back must match
    settings (with the budget's updates, lr and batch). Each file counts its own stage's images and seconds;
    totals: the chain's before this stage (images, seconds, curves). Returns the chain's totals after it; the
    student is left frozen (freeze), the next stage's teacher."""
    ck = common.resume_from(path, kind, reuse or resume)
    if ck is not None and not (reuse if ck.get("finished") else resume):
        ck = None
    settings = dict(settings, iters=budget.total, lr=budget.lr, batch=budget.batch)
    opt = torch.optim.Adam(student.parameters(), lr=budget.lr)
    run = common.train_loop(pg, loss, data, student, teacher, opt, budget,
                            common.Run(path, kind, settings, dict(net=student.net), gen, resume=ck, desc=desc))
    totals = common.add_run(totals, desc, run)
    pg.log(f"{desc}: {run['step']:,} updates of {budget.batch}, {totals['images']:,} images and "
           f"{totals['seconds'] / 60:.1f} min so far; saved {path}")
    common.freeze(student)
    return totals


def distil(args, pg, data, student, stages, folder, settings, gen, loss=None, name="pd", schedule=linear_anneal,
           guide=lambda teacher: teacher, speeds=None, reuse=None, totals=None):
    """Alg. 2's outer loop over the halving stages N in stages: the last student teaches (guide(student): sferd.py's
    attention guidance) a copy of itself, trained on loss(student, teacher, x, gen, N) (default: pd_loss with
    --xflip) in one train_stage run: a fresh Adam under schedule, the file folder/student-<N>steps.pt of kind
    "<name>-student", settings a dict or N -> dict (cfd.py's per-stage tau, beta, gamma). speeds: {N: n}, the
    teacher's steps per student step (default 2). reuse: read a finished stage file back (default --resume); an
    unfinished one is continued with --resume. totals: the chain's before it (images, seconds, curves).
    Returns the last student (the first teacher if there is no stage), its teacher and the chain's totals."""
    loss = loss or (lambda s, T, x, g, N: pd_loss(s, T, x, g, N, args.xflip))
    teacher, totals = student, totals or dict(images=0, seconds=0.0)
    for N in stages:                                             # N = start/2, start/4, ..., --nfe
        teacher, student = guide(student), make_student(student)  # eta <- theta (the last student teaches); theta <- eta
        n = speeds[N] if speeds else 2
        totals = train_stage(pg, lambda s, T, x, g: loss(s, T, x, g, N), stage_budget(args, N, schedule), student,
                             stage_path(folder, N), f"{name}-student", settings(N) if callable(settings) else settings,
                             gen, args.resume if reuse is None else reuse, args.resume, totals, data=data,
                             teacher=teacher, desc=f"{name} {n * N} -> {N} steps")      # a fresh Adam each stage
    return student, teacher, totals


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

# The paper preset's cost, which a paper run on a machine without CUDA is refused with at once: FLOPs of
# one image of a halving stage (two teacher calls, the student with its backward), counted on the meta device by
# `python common.py flops`
# (tests/test_distributed.py counts them again), and the units in the preset's budget (bench_step's total).
PAPER_COST = dict(unit="images", units=96_000_000, flops_per_unit=2.119e11)


def bench_step(teacher, preset, device, batch=None):
    """One update of a halving stage (every stage costs the same: two teacher calls, one student call
    with its backward pass). Unit: images; budget: the preset's whole chain down to 1 step."""
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    student, pg, gen = make_student(teacher), common.Dist(str(device)), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    stages = stage_steps(1, cfg["start_steps"])
    updates = sum(round(cfg["iters"] * (cfg["later_factor"] if N <= cfg["later_steps"] else 1)) for N in stages)
    shape = common.image_shape(student.net)

    def step():
        x = torch.rand((batch, *shape), device=device) * 2 - 1
        with common.autocast(device):
            out = pd_loss(student, teacher, x, gen, stages[0], xflip=True)
        common.optimizer_steps(pg, out, opt, list(student.parameters()), clip=1.0)

    return dict(step=step, unit="images", per_step=batch, total=updates * cfg["batch"], nets=[teacher.net, student.net])


def main(argv=None):
    args = parse_args(argv)
    stages = stage_steps(args.nfe, args.start_steps)
    pg = common.Dist(args.device, args.compile, args.channels_last)
    out = common.run_dir(args.out, args.dataset, f"pd-{args.preset}")
    ev = common.Eval.of(args)
    common.resume_note(pg, args.resume, *[stage_path(out, N) for N in stages])
    fid.check_exports(ev, out / f"nfe{args.nfe}")
    data, teacher, teacher_path = common.load_inputs(ev, pg, args.seed)
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)          # each process its own data/noise
    pg.log(f"pd: {args.dataset}, preset {args.preset}, {args.start_steps} -> {' -> '.join(map(str, stages)) or 'no stage'} "
           f"steps, {args.iters:,} updates of {args.batch} per stage, lr {args.lr:g}, {pg.world} process(es) on {pg.device}")
    settings = dict(start_steps=args.start_steps, teacher_sha256=common.fingerprint(teacher_path), xflip=args.xflip)
    student, _, run = distil(args, pg, data, teacher, stages, out, settings, gen)
    info = dict(method="pd", variant="pd", nfe=args.nfe, train_seconds=run["seconds"], images_seen=run["images"],
                start_steps=args.start_steps, stages=stages, iters_per_stage=args.iters, lr=args.lr,
                batch=args.batch, xflip=args.xflip, sampler="DDIM, x_hat clipped to [-1, 1]")
    # The report compares with the original teacher's solvers.
    fid.report(ev, pg, out / f"nfe{args.nfe}", teacher, teacher_path, lambda eps: sample_ddim(student, eps, args.nfe),
               info, data.shape[1:], student=student, curves=run.get("curves"))
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
