"""SFD: Simple and Fast Distillation of diffusion models into a few-step Euler student (Zhou, Chen, Wang,
Chen, Lyu, NeurIPS 2024, arXiv:2409.19681).

Run
  CPU lab (default preset):  python sfd.py --dataset fashion --nfe 4
  CUDA paper:                python sfd.py --dataset cifar10 --nfe 4 --preset paper
  SFD-v / second stage:      python sfd.py --nfe 2,3,4,5        python sfd.py --nfe 1
  Several processes:         torchrun --nproc_per_node=2 sfd.py --preset smoke

What is implemented (arXiv:2409.19681; authors' code: zju-pi/diff-sampler sfd-main)
  - SFD, Alg. 2 (sfd_loss): one Euler step per interval of a polynomial (rho 7) grid 80 -> t_min = 0.006, the
    first one the analytical first step (AFS, no network call: NFE = points - 2). The teacher (DPM-Solver++(3M))
    runs without gradients on a grid K = 4 times finer; the student steps from its own detached state, is pulled
    (L1) to the teacher's state, with an optimizer step after every student step. Adam, lr/10 after half the run.
  - SFD-v (--nfe 2,3,4,5): one student for several NFEs, drawn per batch, fed through a step embedding.
  - Second stage (--nfe 1): the teacher is the first-stage NFE-5 student with Euler+AFS (trained first if missing).
  - The slides' ablations: --teacher-solver euler|heun|dpm2s|dpm3m, --t-min, --no-afs, --loss l1|l2|huber.

Deviations (and why)
  - The teacher is fewstep's shared one (so all methods compare), the authors' EDM checkpoint with --dataset
    cifar10 --preset paper. SFD reads no training image: images_seen counts trajectories.
  - L1 is the per-pixel mean, not the authors' per-sample sum (sfd-main/training/training_loop.py): for Adam a loss c
    times smaller is the same as eps*c (c = C*H*W: 1e-8 -> 3e-5 on CIFAR-10), so the updates agree except on elements with
    tiny gradients. The authors also train in fp16 and zero NaN gradients. The second stage's LPIPS term on the last step
    is left out (no LPIPS weights offline).
  - SFD-v embeds the NFE (authors: NFE + 2 grid points) and its maps into the U-Net start at zero, so it starts as
    the teacher (authors: random xavier init, a perturbed teacher).
  - The teacher's D is not dynamically thresholded unless --teacher-threshold (the authors' always is; in the lab
    it was worse). The lab preset uses 4x the paper's lr for a run 42x shorter (4,800 trajectories, so that the
    README's main job takes under 15 min on a 2-core CPU: 7,040 scored 0.7 FID-500 better), SFD-v 7,040 (paper: 4x SFD).
  - Samples end at t_min without a final denoising call, as the authors' (denoise_to_zero=False).
"""
import argparse
import math
from pathlib import Path

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import torch
import torch.nn as nn

import cd
import fid

# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

PRESETS = {
    # trajectories: training length in teacher trajectories (= noise images); ckpt_every likewise.
    # *_v: SFD-v (several NFEs, one model); *_2: the second stage (--nfe 1).
    "smoke": dict(batch=4, trajectories=8, trajectories_v=8, trajectories_2=8, lr=1e-4, lr_2=1e-3, ckpt_every=4),
    # A 2-core CPU in minutes: 4x the paper's lr for a run 42x shorter (the README's main job: under 15 min).
    "lab": dict(batch=32, trajectories=4800, trajectories_v=7040, trajectories_2=7040, lr=2e-4, lr_2=5e-4, ckpt_every=1200),
    # sfd-main's launch.sh and train.py: batch 128, Adam 5e-5; 200k trajectories (SFD), 800k (SFD-v), 2M at lr 5e-4 (2nd stage).
    "paper": dict(batch=128, trajectories=200_000, trajectories_v=800_000, trajectories_2=2_000_000, lr=5e-5,
                  lr_2=5e-4, ckpt_every=10_000),
}
SIGMA_MAX, RHO = common.SIGMA_MAX, common.RHO     # EDM's sigma_max and polynomial grid exponent (student and teacher grids)
MAX_NFE = 16                   # beyond this a student is no longer "few-step"; the teacher grid grows as 4*NFE
FIRST_STAGE_NFE = 5            # second stage: teacher = the first-stage model at NFE 5 (paper, Sec. "Extensions")
TEACHER_THRESHOLD = False      # dynamic thresholding of the dpm3m teacher (authors: always; lab: worse)


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default="4", nfe_type=str, presets=PRESETS,
                             paper_cost=PAPER_COST,
                             nfe_help="student NFE: N (SFD), a comma list like 2,3,4,5 (SFD-v, one model), or 1 (second stage)")
    p.add_argument("--teacher-solver", default="dpm3m", choices=["euler", "heun", "dpm2s", "dpm3m"],
                   help="teacher's Solver in Alg. 2 (slides' ablation: dpm3m > dpm2s > heun > euler; default: dpm3m)")
    p.add_argument("--teacher-steps", default=4, type=int,
                   help="K = M+1, teacher steps per student step on the finer grid (default: 4, i.e. M = 3)")
    p.add_argument("--teacher-threshold", action=argparse.BooleanOptionalAction, default=TEACHER_THRESHOLD,
                   help="dynamic thresholding (Imagen's, q = 0.995) of the DPM-Solver++(3M) teacher's D, as the authors' "
                        f"teacher always does (default: {'on' if TEACHER_THRESHOLD else 'off'}; see the header)")
    p.add_argument("--t-min", default=0.006, type=float, help="t_min, the last time of the grids (default: 0.006)")
    p.add_argument("--no-afs", action="store_true",
                   help="no analytical first step: the student spends a network call on t_N -> t_{N-1} (NFE = points - 1)")
    p.add_argument("--loss", default="l1", choices=["l1", "l2", "huber"],
                   help="distance d(x_n^psi, x~_n): l1 (default), l2 or pseudo-Huber (c = 0.00054*sqrt(dim))")
    common.preset_flag(p, "lr", common.learning_rate, "eta, Adam learning rate of SFD and SFD-v (/10 after half the run)")
    common.preset_flag(p, "lr_2", common.learning_rate, "eta of the second stage (--nfe 1)")
    common.preset_flag(p, "trajectories", int, "SFD's training length in teacher trajectories (also the first stage's)")
    common.preset_flag(p, "trajectories_v", int, "SFD-v's training length in teacher trajectories")
    common.preset_flag(p, "trajectories_2", int, "the second stage's training length in trajectories")
    p.add_argument("--first-stage", default=None,
                   help="--nfe 1: the first-stage run folder (default: <runs or --out's parent>/sfd-nfe5; trained if missing)")
    p.add_argument("--stop-after", default=None, type=int,
                   help="stop (checkpointed, resumable with --resume) after this many trajectories; for time-sliced runs "
                   "and tests")
    return p.parse_args(argv)


def parse_nfe(text):
    """--nfe 4 | 2,3,4,5 | 1 -> sorted list of NFEs; UserError on anything else."""
    try:
        nfes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise common.UserError(f"--nfe {text!r}: expected an integer or a comma list of integers such as 2,3,4,5") from None
    if nfes[0] < 1 or nfes[-1] > MAX_NFE:
        raise common.UserError(f"--nfe {text}: SFD needs 1 <= NFE <= {MAX_NFE}")
    if len(nfes) > 1 and nfes[0] == 1:
        raise common.UserError("--nfe 1 is the second stage (distilled from the NFE-5 model); pass it alone, not in an "
                               "SFD-v list")
    return nfes


# ----------------------------------------------------------------------------------------------
# Time grids (EDM's polynomial grid, arXiv:2206.00364 Eq. 5) and SFD's additions to the shared samplers: AFS, the
# thresholded teacher
# ----------------------------------------------------------------------------------------------

def student_grid(nfe, t_min=0.006, afs=True):
    """t_N = sigma_max > ... > t_0 = t_min, polynomial with rho 7 (EDM Eq. 5). AFS costs no network
    call, so NFE = points - 2 with AFS (NFE 2 -> 80, 10.929, 0.670, 0.006) and points - 1 without."""
    return common.karras_sigmas(nfe + 1 + int(afs), t_min, SIGMA_MAX, RHO)


def teacher_grid(t, K):
    """The finer grid of the teacher: each student interval cut into K equal steps in sigma^(1/rho),
    i.e. the polynomial grid of K*(len(t)-1)+1 points (authors: (M+1)*(num_steps-1)+1). Every K-th
    point is set to the student time itself, so x~ lands exactly on the student grid."""
    a = t ** (1 / RHO)
    frac = torch.arange(K, dtype=torch.float64) / K
    fine = (a[:-1, None] + frac[None] * (a[1:] - a[:-1])[:, None]) ** RHO
    fine[:, 0] = t[:-1]
    return torch.cat([fine.flatten(), t[-1:]])


def afs_step(x, sigma_cur, sigma_next):
    """The analytical first step (AFS): no network call, slope d = x/sqrt(1 + sigma^2) (exact at sigma_max to 1e-4)."""
    return x + (sigma_next - sigma_cur) * x / math.sqrt(1 + float(sigma_cur) ** 2)


def afs_then(sampler):
    """AFS as the first step of the grid, then sampler on the rest; callback(i, x) counts steps of the whole grid."""
    def sample(D, x, sigmas, callback=None):
        x = afs_step(x, float(sigmas[0]), float(sigmas[1]))
        if callback:
            callback(0, x)
        return sampler(D, x, sigmas[1:], (lambda i, x_i: callback(i + 1, x_i)) if callback else None)
    return sample


def dynamic_threshold(x0, quantile=0.995):
    """Imagen's dynamic thresholding (the SFD authors' teacher): s = max(q(|x0|), 1), x0 <- clamp(x0, -s, s)/s."""
    s = x0.abs().flatten(1).quantile(quantile, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
    return x0.clamp(-s, s) / s


def thresholded_denoiser(D):
    """D with dynamic thresholding of its output: a wrapper, so the shared solvers stay as they are."""
    return lambda x, sigma: dynamic_threshold(D(x, sigma))


def sample_dpm2s(D, x, sigmas, callback=None):
    """DPM-Solver-2 (Lu et al. 2022), the slides' DPM(2S): Euler to the geometric midpoint
    t_mid = sqrt(t_cur*t_next), then the whole step with the midpoint's slope (authors' r = 0.5)."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d_cur = (x - D(x, t_cur)) / t_cur
        t_mid = math.sqrt(t_cur * t_next)
        x_mid = x + (t_mid - t_cur) * d_cur
        x = x + (t_next - t_cur) * (x_mid - D(x_mid, t_mid)) / t_mid
        if callback:
            callback(i, x)
    return x


TEACHER_SOLVERS = {   # name -> (sampler(D, x, sigmas, callback), network calls per step)
    "euler": (common.sample_euler, 1),
    "heun": (common.sample_heun, 2),
    "dpm2s": (sample_dpm2s, 2),
    "dpm3m": (lambda D, x, sigmas, callback=None: common.sample_dpmpp(D, x, sigmas, callback, order=3), 1),
    "euler+afs": (afs_then(common.sample_euler), 1),     # the student's sampler: the second stage's teacher
}


@torch.no_grad()
def teacher_states(teacher, x_T, t_fine, K, solver="dpm3m"):
    """x~_n of Alg. 2: the teacher's trajectory from x_T on the finer grid, read out at every K-th
    point, i.e. at the student times t_{N-1} .. t_0 = t_min. Returns a list, one state per student step."""
    states = []                                                    # states[i]: the state at t_fine[i + 1]
    TEACHER_SOLVERS[solver][0](teacher, x_T, t_fine, lambda i, x: states.append(x))
    return states[K - 1::K]


# ----------------------------------------------------------------------------------------------
# The student: one Euler step per interval; SFD-v's step condition; SFD's Algorithm 2
# ----------------------------------------------------------------------------------------------

class StepEmbedding(nn.Module):
    """SFD-v: the NFE as a condition. Positional embedding -> Linear -> SiLU -> Linear -> SiLU; the
    U-Net's res blocks read it through their zero-initialised AdaGN maps (common.ResBlock)."""

    def __init__(self, cond_dim, pos_dim):
        super().__init__()
        self.pos_dim = pos_dim
        self.mlp = nn.Sequential(nn.Linear(pos_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim), nn.SiLU())

    def forward(self, nfe, batch, device):
        return self.mlp(common.timestep_embedding(torch.full((batch,), float(nfe), device=device), self.pos_dim))


def euler_step(D, x, t_cur, t_next, cond=None):
    """Alg. 2 line 3, Euler(x_{n+1}, t_{n+1}, t_n, 1; psi): d = (x - D_psi(x, t_{n+1}))/t_{n+1}."""
    d = (x - D(x, t_cur, cond)) / t_cur
    return x + (t_next - t_cur) * d


def distance(name, a, b):
    """d(x_n^psi, x~_n): the slides' ablation, L1 > pseudo-Huber (cd.py's, iCT's) > LPIPS > L2."""
    if name == "l1":
        return (a - b).abs().mean()
    if name == "l2":
        return ((a - b) ** 2).mean()
    return cd.pseudo_huber(a, b).mean()


def sfd_loss(student, teacher, eps, gen, nfes, nfe_gen, embed=None, K=4, solver="dpm3m", afs=True, loss="l1",
             t_min=0.006):
    """SFD's Alg. 2 for one batch of unit noise eps, as a generator: it yields d(x_n^psi, x~_n) of each student
    step n = N-1 .. 0, and the loop (common.optimizer_steps) takes line 5's step psi <- psi - eta grad before
    the next, which then runs the updated student. gen is not needed: the loop drew eps, and SFD-v's NFE
    comes from nfe_gen, drawn alike on every process."""
    nfe = nfes[torch.randint(len(nfes), (1,), generator=nfe_gen).item()]     # SFD-v: NFE ~ U(nfes) per batch
    t = student_grid(nfe, t_min, afs)                                        # t_N = sigma_max > ... > t_0 = t_min
    x_T = SIGMA_MAX * eps                                                    # line 1: x_T ~ N(0, T^2 I)
    x_tilde = teacher_states(teacher, x_T, teacher_grid(t, K), K, solver)    # line 4: Solver(x_T, t_N -> t_n; phi)
    x = x_T
    for k, (t_cur, t_next) in enumerate(zip(t[:-1].tolist(), t[1:].tolist())):   # line 2: n = N-1 .. 0 (n = N-1-k)
        if afs and k == 0:
            x = afs_step(x, t_cur, t_next)                                   # AFS: no network, nothing to learn
            continue
        cond = embed(nfe, len(x), x.device) if embed else None              # SFD-v's condition (updated weights)
        x_psi = euler_step(student, x, t_cur, t_next, cond)                  # line 3: x_n^psi = Euler(x_{n+1}; psi)
        yield distance(loss, x_psi.float(), x_tilde[k])                      # line 5: d(x_n^psi, x~_n), psi updated
        x = x_psi.detach()                                                   # line 6: x_n <- detach(x_n^psi)


# ----------------------------------------------------------------------------------------------
# Training (boilerplate: run name, settings, the second stage's first stage, evaluation)
# ----------------------------------------------------------------------------------------------

def thresholded(args):
    """Whether the teacher's D is dynamically thresholded: only DPM-Solver++(3M) has the option (as in the authors' code)."""
    return args.teacher_solver == "dpm3m" and args.teacher_threshold


def run_name(args, nfes):
    """sfd-nfe4, sfd-v-nfe2-3-4-5, sfd-nfe1 (second stage); ablations add a suffix (sfd-nfe4-heun-noafs,
    sfd-nfe4-thr / -nothr for a thresholding other than the default)."""
    name = "sfd-v-nfe" + "-".join(map(str, nfes)) if len(nfes) > 1 else f"sfd-nfe{nfes[0]}"
    ablations = [(args.teacher_solver != "dpm3m", args.teacher_solver), (args.teacher_steps != 4, f"K{args.teacher_steps}"),
                 (args.t_min != 0.006, f"tmin{args.t_min:g}"), (args.no_afs, "noafs"), (args.loss != "l1", args.loss),
                 (args.teacher_solver == "dpm3m" and args.teacher_threshold != TEACHER_THRESHOLD,
                  "thr" if args.teacher_threshold else "nothr")]
    return "-".join([name] + [suffix for on, suffix in ablations if on])


def run_settings(args, nfes):
    """What a run's student depends on, saved in its checkpoint: a --resume with other settings is refused."""
    afs = not args.no_afs
    if nfes == [1]:                     # the stage-1 student with its own sampler (Euler+AFS) on its own grid
        solver, K, threshold = "euler+afs" if afs else "euler", (FIRST_STAGE_NFE + int(afs)) // (1 + int(afs)), False
        total, lr = args.trajectories_2, args.lr_2
    else:
        solver, K, threshold = args.teacher_solver, args.teacher_steps, thresholded(args)
        total, lr = args.trajectories_v if len(nfes) > 1 else args.trajectories, args.lr
    return dict(nfes=nfes, afs=afs, t_min=args.t_min, solver=solver, K=K, threshold=threshold, loss=args.loss,
                lr=lr, batch=args.batch, trajectories=total)


def with_(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def first_stage(args, pg, teacher, teacher_sha256):
    """--nfe 1: the first-stage student, from --first-stage or else from the folder a plain `--nfe 5` run with the
    same flags writes (it must hold what that run trains); trained first if the folder holds no finished one."""
    name = run_name(args, [FIRST_STAGE_NFE])
    folder = args.first_stage or (Path(args.out).parent / name if args.out else common.run_dir(None, args.dataset, name))
    path = Path(folder) / "student.pt"
    stage1_args = with_(args, nfe=str(FIRST_STAGE_NFE), out=str(path.parent), resume=True, first_stage=None, stop_after=None)
    if not (path.exists() and common.load_checkpoint(path, "sfd-student")["finished"]):
        pg.log(f"second stage: no finished first-stage model at {path}; training it first (NFE {FIRST_STAGE_NFE})")
        train(stage1_args, pg)
    ck = common.load_checkpoint(path, "sfd-student")
    same = {} if args.first_stage else run_settings(stage1_args, [FIRST_STAGE_NFE])   # the default folder: `--nfe 5`'s,
    common.check_settings(ck, path, dict(same, teacher_sha256=teacher_sha256))       # distilled from this teacher
    if "embed" in ck or ck["settings"]["afs"] != (not args.no_afs) or ck["settings"]["t_min"] != args.t_min:
        raise common.UserError(f"{path}: the first stage must be a plain SFD run with the same --t-min and AFS setting")
    net = common.student_from(teacher.net)
    common.load_state(net, ck["net"], path)
    return common.freeze(common.Denoiser(net))


def train(args, pg):
    """Distil and evaluate one run (SFD, SFD-v or the second stage); returns its metrics."""
    nfes = parse_nfe(args.nfe)
    if args.teacher_steps < 1:
        raise common.UserError(f"--teacher-steps {args.teacher_steps}: K must be >= 1")
    if not 0 < args.t_min < SIGMA_MAX:
        raise common.UserError(f"--t-min {args.t_min}: must lie in (0, {SIGMA_MAX:g})")
    afs, second_stage, variable = not args.no_afs, nfes == [1], len(nfes) > 1
    settings = run_settings(args, nfes)
    solver, K, total, lr, batch = (settings[k] for k in ("solver", "K", "trajectories", "lr", "batch"))
    out = common.run_dir(args.out, args.dataset, run_name(args, nfes))
    ev = common.Eval.of(args)
    fid.check_exports(ev, *([out / f"nfe{n}" for n in nfes] if variable else [out]))
    teacher, teacher_path = common.load_teacher(ev, pg)                 # the shared teacher: evaluation reference
    settings["teacher_sha256"] = common.fingerprint(teacher_path)      # checked on --resume
    source = first_stage(args, pg, teacher, settings["teacher_sha256"]) if second_stage else teacher

    # Student psi: a copy of its teacher's U-Net (+ SFD-v's zero-initialised step condition).
    common.seed_all(args.seed)
    if variable:
        common.require_arch(source.net, ("fewstep",), "SFD-v feeds the NFE through the student U-Net's extra condition")
    ch = source.net.config.get("ch")
    net = common.student_from(source.net, cond_dim=4 * ch if variable else 0)
    D = common.Denoiser(net)
    embed = StepEmbedding(4 * ch, ch).to(pg.device) if variable else None
    nets = dict(net=net, embed=embed) if embed else dict(net=net)
    opt = torch.optim.Adam([p for m in nets.values() for p in m.parameters()], lr=lr)
    rollout = thresholded_denoiser(source) if settings["threshold"] else source       # the teacher phi of Alg. 2

    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)      # each process its own noise
    nfe_gen = torch.Generator().manual_seed(args.seed)                  # SFD-v's NFE draw: alike on every process
    ck_path = out / "student.pt"
    resume = common.resume_from(ck_path, "sfd-student", args.resume, pg)
    pg.log(f"{out.name}: student NFE {','.join(map(str, nfes))}, {common.count_params(net) / 1e6:.2f} M params, teacher "
           f"{'stage-1 ' * second_stage}{solver} with K = {K}, {total:,} trajectories, batch {batch}, lr {lr:g}, "
           f"{pg.world} process(es) on {pg.device}")
    budget = common.Budget(total, "trajectories", batch, lr, args.ckpt_every, stop_after=args.stop_after,
                           schedule=lambda lr, done, total: lr if done < total / 2 else lr / 10)    # lr/10 after half the run
    loss = lambda student, teacher, eps, gen: sfd_loss(student, teacher, eps, gen, nfes, nfe_gen, embed, K, solver,
                                                       afs, args.loss, args.t_min)
    # sfd_loss yields one loss per student step: the loop takes an optimizer step after each (Alg. 2 line 5).
    run = common.train_loop(pg, loss, common.image_shape(net), D, rollout, opt, budget, common.Run(   # data: noise
        ck_path, "sfd-student", settings, nets, gen, shared_rngs=dict(nfe_rng=nfe_gen), resume=resume, desc="sfd"))
    done, seconds = run["done"], run["seconds"]
    if not run["finished"]:
        pg.log(f"stopped at {done:,} of {total:,} trajectories; continue with --resume")
        pg.barrier()
        return None

    # Evaluation: the student's sampler, Euler (with AFS) over its grid from x = sigma_max*eps, as the authors sample.
    net.eval()
    sampler, shape = TEACHER_SOLVERS["euler+afs" if afs else "euler"][0], common.image_shape(net)
    grids = {n: student_grid(n, args.t_min, afs) for n in nfes}

    def sample_fn(n):
        cond = (lambda b: embed(n, b, pg.device)) if embed else (lambda b: None)
        return lambda eps: sampler(lambda x, s: D(x, s, cond(len(x))), SIGMA_MAX * eps, grids[n])

    variant = "sfd-stage2" if second_stage else ("sfd-v" if variable else "sfd")
    all_metrics = [fid.report(ev, pg, out / f"nfe{n}" if variable else out, teacher, teacher_path, sample_fn(n), dict(
        method="sfd", variant=variant, nfe=n, train_seconds=seconds, images_seen=done, trajectories=done,
        teacher_solver=f"{solver} (stage 1)" if second_stage else solver, teacher_steps_K=K,
        teacher_threshold=settings["threshold"], teacher_nfe_per_trajectory=K * (len(grids[n]) - 1) * TEACHER_SOLVERS[solver][1],
        t_min=args.t_min, afs=afs, loss=args.loss, lr=lr, batch=batch, student_grid=grids[n].tolist()), shape,
        student=D, curves=[common.curve_of(variant, run)]) for n in nfes]
    if variable and pg.main:                         # SFD-v: all NFEs side by side, one row of samples each
        common.write_json(out / "metrics-all.json", all_metrics)       # each nfe<N>/metrics.json is one row
        eps = common.PerSampleNoise(common.EVAL_SEED, range(8), pg.device).randn(*shape)
        with torch.no_grad():
            common.save_grid(torch.cat([sample_fn(n)(eps) for n in nfes]).clamp(-1, 1), out / "samples.png", nrow=8)
        col = lambda key, fmt: "/".join("n/a" if m.get(key) is None else fmt.format(m[key]) for m in all_metrics)
        print(f"sfd-v {args.dataset} NFE {'/'.join(map(str, nfes))}: student FID {col('fid', '{:.2f}')} vs teacher "
              f"DPM-Solver++(3M) {col('teacher_fid_dpm3m', '{:.2f}')}; teacher_rms student {col('teacher_rms', '{:.4f}')} "
              f"vs teacher {col('teacher_rms_dpm3m', '{:.4f}')}; {seconds / 60:.1f} min, {done:,} trajectories; {out}")
    pg.barrier()
    return all_metrics if variable else all_metrics[0]


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

# The paper preset's cost, which a paper run on a machine without CUDA is refused with at once: FLOPs of
# one trajectory of Alg. 2 at NFE 4 (the teacher's roll-out and the student's steps), counted on the meta device by
# `python common.py flops`
# (tests/test_distributed.py counts them again), and the units in the preset's budget (bench_step's total).
PAPER_COST = dict(unit="trajectories", units=200_000, flops_per_unit=1.356e12)


def bench_step(teacher, preset, device, batch=None):
    """Alg. 2 for one batch of trajectories at NFE 4: the teacher's roll-out and the student's steps with
    their updates, as train() runs them. Unit: trajectories; budget: the preset's SFD length."""
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    net = common.student_from(teacher.net)
    D, opt = common.Denoiser(net), torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    pg, nfe_gen, shape = common.Dist(str(device)), torch.Generator(), common.image_shape(net)

    def step():
        eps = torch.randn((batch, *shape), device=device)
        common.optimizer_steps(pg, sfd_loss(D, teacher, eps, None, [4], nfe_gen), opt, list(net.parameters()))

    return dict(step=step, unit="trajectories", per_step=batch, total=cfg["trajectories"], nets=[teacher.net, net])


def main():
    args = parse_args()
    parse_nfe(args.nfe)                     # bad --nfe: one line before anything is loaded
    pg = common.Dist(args.device, args.compile, args.channels_last)
    try:
        train(args, pg)
    finally:
        pg.close()


if __name__ == "__main__":
    common.main_guard(main)
