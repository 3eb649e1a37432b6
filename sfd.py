"""SFD: Simple and Fast Distillation of Diffusion Models.

Zhenyu Zhou, Defang Chen, Can Wang, Chun Chen, Siwei Lyu. NeurIPS 2024. arXiv:2409.19681.
Source: ../shared/papers/sfd-slides.md (Algorithm 2, the ablation table), ../shared/specs/METHODS.md
section 3, and the authors' code (zju-pi/diff-sampler, sfd-main/training/{loss,training_loop}.py).

What is implemented
  SFD (Alg. 2): the student takes one Euler step per interval of a short polynomial (rho 7) grid
    sigma_max = 80 -> t_min = 0.006; its first step is the analytical first step (AFS, no network
    call), so NFE = points - 2. Per batch of noise x_T the teacher (DPM-Solver++(3M)) is rolled out
    without gradients on a finer grid with K = M+1 = 4 steps per student step (the authors' order rule,
    common.dpmpp_order; dynamic thresholding: see the deviations); the student then steps
    from its own detached state and is pulled (L1) to the teacher state at the same time, with an
    optimizer step after every student step. Adam lr 5e-5, lr/10 after half the run, no EMA.
  SFD-v (--nfe 2,3,4,5): one student for several NFEs; the NFE is drawn uniformly per batch and
    enters through its own embedding (positional -> Linear -> SiLU -> Linear -> SiLU) as the
    zero-initialised extra condition of common.student_from, so training starts from the teacher (see the
    deviations: the authors initialise it randomly).
  Second stage (--nfe 1): the teacher is the first-stage student at NFE 5 sampled with Euler+AFS
    (trained first, in its own run folder, if missing); the student starts from its weights and
    learns the one-call grid sigma_max -> AFS -> t_min.
  Ablations of the slides' table: --teacher-solver euler|heun|dpm2s|dpm3m, --t-min, --no-afs,
    --loss l1|l2|huber.

Deviations (and why)
  - The teacher is fewstep's shared EDM-trained teacher (so all methods compare side by side), except
    with --dataset cifar10 --preset paper, where it is the authors' EDM checkpoint (--teacher edm).
    SFD reads no training image: images_seen counts trajectories.
  - L1 is the per-pixel mean, not the per-sample sum of the authors' code: Adam is invariant to
    that constant factor. The second stage's extra LPIPS term on the last step (authors' code, EDM
    models) is left out: LPIPS weights are not available offline.
  - SFD-v embeds the NFE (the authors embed the number of grid points = NFE + 2, same information). Its
    maps into the U-Net start at zero, so the SFD-v student equals the teacher at init (fewstep's choice);
    the authors' step-condition layers (map_step_layer0/1 and each block's affine_step in
    sfd-main/models/networks_edm.py) use the random xavier_uniform init of the other layers, so their
    SFD-v starts from a perturbed teacher.
  - --resume refuses other settings (solver, K, thresholding, loss, lr, batch, length, NFEs, t_min, AFS;
    stored in student.pt), and the default first-stage folder of --nfe 1 must hold what `--nfe 5` trains.
  - The lab preset uses lr 2e-4 instead of 5e-5 (a 2-core CPU affords ~7k trajectories instead of
    the paper's 200k) and trains SFD-v as long as SFD (paper: 4x); the paper preset keeps the paper's values.
  - The teacher's D is not dynamically thresholded by default (--teacher-threshold turns Imagen's q = 0.995
    thresholding on). The authors' teacher always thresholds (dpm_pp_sampler calls dynamic_thresholding_fn,
    sfd-main/solvers.py and solver_utils.py). Measured in the lab, one seed each (README, "Lab results"):
    off FID-500 72.90, teacher_rms 0.1094; on 74.07, 0.1189 (`python sfd.py --dataset fashion --nfe 4
    --teacher-threshold`): worse, so fewstep keeps it off. The teacher rows (fid.report) are unthresholded.
  - Samples end at t_min without a final denoising call, as the authors' sampler does
    (denoise_to_zero=False): the leftover noise of std 0.006 is below one uint8 level.

Run
  CPU lab (default preset):  python sfd.py --dataset fashion --nfe 4
  CUDA paper:                python sfd.py --dataset cifar10 --nfe 4 --preset paper
  SFD-v / second stage:      python sfd.py --nfe 2,3,4,5        python sfd.py --nfe 1
  Several processes:         torchrun --nproc_per_node=2 sfd.py --preset smoke
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

import fid
from common import (Denoiser, Dist, PerSampleNoise, UserError, EVAL_SEED, afs_step, autocast, build_net, check_finite,
                    check_same_teacher, check_exports, common_parser, count_params, fingerprint, first_paragraph,
                    image_shape, karras_sigmas, learning_rate, load_checkpoint, load_state, load_teacher, main_guard,
                    run_dir, sample_dpmpp, sample_euler, sample_heun, require_arch, save_checkpoint, save_grid,
                    seed_all, student_from, timestep_embedding, write_json)

from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

PRESETS = {
    # trajectories: training length in teacher trajectories (= noise images); ckpt_every likewise.
    # *_v: SFD-v (several NFEs, one model); *_2: the second stage (--nfe 1).
    "smoke": dict(batch=4, trajectories=8, trajectories_v=8, trajectories_2=8, lr=1e-4, lr_2=1e-3, ckpt_every=4),
    # 2-core CPU: ~11 min of training at NFE 4 (~10.6 trajectories/s); 4x the paper's lr for a run 28x shorter.
    # 7,040 trajectories gave FID-500 72.90 / teacher_rms 0.1094 against 74.18 / 0.1142 for 3,840 (2026-11-29).
    "lab": dict(batch=32, trajectories=7040, trajectories_v=7040, trajectories_2=7040, lr=2e-4, lr_2=5e-4,
                ckpt_every=1760),
    # METHODS.md 3: batch 128, Adam 5e-5; 200k trajectories (SFD), 800k (SFD-v), 2M at lr 5e-4 (2nd stage).
    "paper": dict(batch=128, trajectories=200_000, trajectories_v=800_000, trajectories_2=2_000_000, lr=5e-5,
                  lr_2=5e-4, ckpt_every=10_000),
}
SIGMA_MAX, RHO = 80.0, 7.0     # EDM's sigma_max and polynomial grid exponent (student and teacher grids)
MAX_NFE = 16                   # beyond this a student is no longer "few-step"; the teacher grid grows as 4*NFE
FIRST_STAGE_NFE = 5            # second stage: teacher = the first-stage model at NFE 5 (paper, Sec. "Extensions")
TEACHER_THRESHOLD = False      # dynamic thresholding of the dpm3m teacher (authors: always; lab: worse, see the header)


def parse_args(argv=None):
    p = common_parser(first_paragraph(__doc__), nfe_default="4", nfe_type=str,
                      nfe_help="student NFE: N (SFD), a comma list like 2,3,4,5 (SFD-v, one model), or 1 (second stage)")
    p.add_argument("--teacher-solver", default="dpm3m", choices=list(TEACHER_SOLVERS),
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
    p.add_argument("--lr", default=None, type=learning_rate, help="eta, Adam learning rate (default: the preset's; /10 after half the run)")
    p.add_argument("--trajectories", default=None, type=int, help="training length in teacher trajectories (default: the preset's)")
    p.add_argument("--first-stage", default=None,
                   help="--nfe 1: the first-stage run folder (default: <runs or --out's parent>/sfd-nfe5; trained if missing)")
    p.add_argument("--stop-after", default=None, type=int,
                   help="stop (checkpointed, resumable with --resume) after this many trajectories; for time-sliced runs and tests")
    return p.parse_args(argv)


def parse_nfe(text):
    """--nfe 4 | 2,3,4,5 | 1 -> sorted list of NFEs; UserError on anything else."""
    try:
        nfes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise UserError(f"--nfe {text!r}: expected an integer or a comma list of integers such as 2,3,4,5") from None
    if nfes[0] < 1 or nfes[-1] > MAX_NFE:
        raise UserError(f"--nfe {text}: SFD needs 1 <= NFE <= {MAX_NFE}")
    if len(nfes) > 1 and nfes[0] == 1:
        raise UserError("--nfe 1 is the second stage (distilled from the NFE-5 model); pass it alone, not in an SFD-v list")
    return nfes


# ----------------------------------------------------------------------------------------------
# Time grids (METHODS.md 3)
# ----------------------------------------------------------------------------------------------

def student_grid(nfe, t_min=0.006, afs=True):
    """t_N = sigma_max > ... > t_0 = t_min, polynomial with rho 7 (EDM Eq. 5). AFS costs no network
    call, so NFE = points - 2 with AFS (NFE 2 -> 80, 10.929, 0.670, 0.006) and points - 1 without."""
    return karras_sigmas(nfe + 1 + int(afs), t_min, SIGMA_MAX, RHO)


def teacher_grid(t, K):
    """The finer grid of the teacher: each student interval cut into K equal steps in sigma^(1/rho),
    i.e. the polynomial grid of K*(len(t)-1)+1 points (authors: (M+1)*(num_steps-1)+1). Every K-th
    point is set to the student time itself, so x~ lands exactly on the student grid."""
    a = t ** (1 / RHO)
    frac = torch.arange(K, dtype=torch.float64) / K
    fine = (a[:-1, None] + frac[None] * (a[1:] - a[:-1])[:, None]) ** RHO
    fine[:, 0] = t[:-1]
    return torch.cat([fine.flatten(), t[-1:]])


# ----------------------------------------------------------------------------------------------
# Teacher: a multistep solver on the finer grid, kept at the student times (Alg. 2 line 4)
# ----------------------------------------------------------------------------------------------

def sample_dpm2s(D, x, sigmas, callback=None, afs=False):
    """DPM-Solver-2 (Lu et al. 2022), the slides' DPM(2S): Euler to the geometric midpoint
    t_mid = sqrt(t_cur*t_next), then the whole step with the midpoint's slope (authors' r = 0.5)."""
    sigmas = [float(s) for s in sigmas]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if afs and i == 0:
            x = afs_step(x, t_cur, t_next)
        else:
            d_cur = (x - D(x, t_cur)) / t_cur
            t_mid = math.sqrt(t_cur * t_next)
            x_mid = x + (t_mid - t_cur) * d_cur
            x = x + (t_next - t_cur) * (x_mid - D(x_mid, t_mid)) / t_mid
        if callback:
            callback(i, x)
    return x


TEACHER_SOLVERS = {   # name -> (sampler(D, x, sigmas, callback, afs, threshold), network calls per step)
    "euler": (lambda D, x, s, cb, afs, thr: sample_euler(D, x, s, cb, afs=afs), 1),
    "heun": (lambda D, x, s, cb, afs, thr: sample_heun(D, x, s, cb, afs=afs), 2),
    "dpm2s": (lambda D, x, s, cb, afs, thr: sample_dpm2s(D, x, s, cb, afs=afs), 2),
    "dpm3m": (lambda D, x, s, cb, afs, thr: sample_dpmpp(D, x, s, cb, order=3, afs=afs, threshold=thr), 1),
}


@torch.no_grad()
def teacher_states(teacher, x_T, t_fine, K, solver="dpm3m", afs=False, threshold=False):
    """x~_n of Alg. 2: the teacher's trajectory from x_T on the finer grid, read out at every K-th
    point, i.e. at the student times t_1 (after x_T) .. t_min. Returns a list, one state per student step."""
    states = []

    def keep(i, x):                     # x is the state at t_fine[i + 1]
        if (i + 1) % K == 0:
            states.append(x)

    TEACHER_SOLVERS[solver][0](teacher, x_T, t_fine, keep, afs, threshold)
    return states


# ----------------------------------------------------------------------------------------------
# Student: one Euler step per interval; SFD-v's step condition
# ----------------------------------------------------------------------------------------------

class StepEmbedding(nn.Module):
    """SFD-v: the NFE as a condition. Positional embedding -> Linear -> SiLU -> Linear -> SiLU; the
    U-Net's res blocks read it through their zero-initialised AdaGN maps (common.ResBlock)."""

    def __init__(self, cond_dim, pos_dim):
        super().__init__()
        self.pos_dim = pos_dim
        self.mlp = nn.Sequential(nn.Linear(pos_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim), nn.SiLU())

    def forward(self, nfe, batch, device):
        return self.mlp(timestep_embedding(torch.full((batch,), float(nfe), device=device), self.pos_dim))


def euler_step(D, x, t_cur, t_next, cond=None):
    """Alg. 2 line 3, Euler(x_{n+1}, t_{n+1}, t_n, 1; psi): d = (x - D_psi(x, t_{n+1}))/t_{n+1}."""
    d = (x - D(x, t_cur, cond)) / t_cur
    return x + (t_next - t_cur) * d


def distance(name, a, b):
    """d(x_n^psi, x~_n): the slides' ablation, L1 > pseudo-Huber > LPIPS > L2."""
    if name == "l1":
        return (a - b).abs().mean()
    if name == "l2":
        return ((a - b) ** 2).mean()
    c = 0.00054 * math.sqrt(a[0].numel())           # pseudo-Huber constant of iCT (Song & Dhariwal 2023)
    return (((a - b) ** 2).flatten(1).sum(1) + c**2).sqrt().sub(c).mean()


def distill_trajectory(D, x_T, x_tilde, t, update, afs=True, loss="l1", cond_fn=lambda: None):
    """Alg. 2, the inner loop over n = N-1 .. 0 for one batch of trajectories. update(loss) does
    backward + optimizer step. Returns the student's final state and the losses."""
    x, losses = x_T, []
    for k, (t_cur, t_next) in enumerate(zip(t[:-1].tolist(), t[1:].tolist())):
        if afs and k == 0:
            x = afs_step(x, t_cur, t_next)                       # AFS: no network, nothing to learn
            continue
        with autocast(x.device):
            x_psi = euler_step(D, x, t_cur, t_next, cond_fn())   # line 3
        l = distance(loss, x_psi.float(), x_tilde[k])            # line 5: d(x_n^psi, x~_n)
        update(l)                                                # line 5: psi <- psi - eta grad
        x = x_psi.detach()                                       # line 6: x_n <- detach(x_n^psi)
        losses.append(l.item())
    return x, losses


# ----------------------------------------------------------------------------------------------
# Training
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
    """What a run's student depends on, saved in its student.pt: a --resume with other settings is refused."""
    cfg, second_stage, variable = PRESETS[args.preset], nfes == [1], len(nfes) > 1
    afs = not args.no_afs
    if second_stage:                    # Euler+AFS on the stage-1 grid, at the second stage's length and lr
        solver, K, threshold = "euler", (FIRST_STAGE_NFE + int(afs)) // (1 + int(afs)), False
        total, lr = cfg["trajectories_2"], cfg["lr_2"]
    else:
        solver, K, threshold = args.teacher_solver, args.teacher_steps, thresholded(args)
        total, lr = cfg["trajectories_v" if variable else "trajectories"], cfg["lr"]
    return dict(nfes=nfes, afs=afs, t_min=args.t_min, solver=solver, K=K, threshold=threshold, loss=args.loss,
                lr=args.lr if args.lr is not None else lr, batch=args.batch_size or cfg["batch"],
                trajectories=args.trajectories if args.trajectories is not None else total)


def check_settings(ck, path, settings):
    """Refuse to continue (or reuse) a run trained with other settings."""
    old = ck.get("settings") or {}
    changed = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v]
    if changed:
        raise UserError(f"{path} was trained with other settings: {', '.join(changed)}; use another --out or drop --resume")


def with_(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def first_stage_dir(args):
    """--nfe 1: where the first stage lives (the folder a plain `--nfe 5` run with the same flags writes)."""
    if args.first_stage:
        return Path(args.first_stage)
    name = run_name(args, [FIRST_STAGE_NFE])
    return Path(args.out).parent / name if args.out else run_dir(with_(args, out=None), name)


def load_student(path):
    """(Denoiser, StepEmbedding or None, checkpoint) of a finished or partial SFD run."""
    ck = load_checkpoint(path, "sfd-student")
    net = build_net(ck["net_config"])
    load_state(net, ck["net"], path)
    embed = None
    if ck["embed"] is not None:
        embed = StepEmbedding(ck["net_config"]["cond_dim"], ck["net_config"]["ch"])
        load_state(embed, ck["embed"], path)
    return Denoiser(net), embed, ck


def train(args, pg):
    """Distil and evaluate one run (SFD, SFD-v or the second stage); returns its metrics."""
    nfes = parse_nfe(args.nfe)
    if args.teacher_steps < 1:
        raise UserError(f"--teacher-steps {args.teacher_steps}: K must be >= 1")
    if not 0 < args.t_min < SIGMA_MAX:
        raise UserError(f"--t-min {args.t_min}: must lie in (0, {SIGMA_MAX:g})")
    cfg = PRESETS[args.preset]
    afs, second_stage, variable = not args.no_afs, nfes == [1], len(nfes) > 1
    settings = run_settings(args, nfes)
    out = run_dir(args, run_name(args, nfes))
    check_exports(args, *([out / f"nfe{n}" for n in nfes] if variable else [out]))
    solver, K, threshold, total, lr, batch = (settings[k] for k in ("solver", "K", "threshold", "trajectories", "lr", "batch"))
    teacher, teacher_path = load_teacher(args, pg)               # the shared teacher: evaluation reference
    teacher_sha256 = fingerprint(teacher_path)                   # recorded in student.pt, checked on --resume

    if second_stage:
        # Stage 1 (the same run as `--nfe 5`), trained first if its folder has no finished student.
        stage1 = first_stage_dir(args)
        ck_path = stage1 / "student.pt"
        stage1_args = with_(args, nfe=str(FIRST_STAGE_NFE), out=str(stage1), resume=True, first_stage=None,
                            lr=None, trajectories=None, stop_after=None)        # stage 1 at its preset's values
        if not (ck_path.exists() and load_checkpoint(ck_path, "sfd-student")["finished"]):
            pg.log(f"second stage: no finished first-stage model at {ck_path}; training it first (NFE {FIRST_STAGE_NFE})")
            train(stage1_args, pg)
        src, _, ck1 = load_student(ck_path)
        if not args.first_stage:                                 # the default folder must hold what `--nfe 5` trains
            check_settings(ck1, ck_path, run_settings(stage1_args, [FIRST_STAGE_NFE]))
        check_same_teacher(ck1, ck_path, teacher_sha256)            # stage 1 was distilled from this teacher
        if ck1["embed"] is not None or ck1["afs"] != afs or ck1["t_min"] != args.t_min:
            raise UserError(f"{ck_path}: the first stage must be a plain SFD run with the same --t-min and AFS setting")
        D_teach = src.to(pg.device).eval().requires_grad_(False)
    else:
        D_teach = teacher
    local = pg.batch(batch)

    # Student psi: a copy of its teacher's U-Net (+ SFD-v's zero-initialised step condition).
    seed_all(args.seed)
    if variable:
        require_arch(D_teach.net, ("fewstep",), "SFD-v feeds the NFE through the student U-Net's extra condition")
    ch = D_teach.net.config.get("ch")
    net = student_from(D_teach.net, cond_dim=4 * ch if variable else 0)
    D = Denoiser(net)
    embed = StepEmbedding(4 * ch, ch).to(pg.device) if variable else None
    params = list(net.parameters()) + (list(embed.parameters()) if embed else [])
    opt = torch.optim.Adam(params, lr=lr)
    grids = {n: student_grid(n, args.t_min, afs) for n in nfes}
    fine = {n: teacher_grid(grids[n], K) for n in nfes}
    shape = image_shape(net)

    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)      # each process its own noise
    nfe_gen = torch.Generator().manual_seed(args.seed)                  # SFD-v's NFE draw: same on all ranks
    done, seconds, ck_path = 0, 0.0, out / "student.pt"
    if args.resume and ck_path.exists():
        _, _, ck = load_student(ck_path)
        check_settings(ck, ck_path, settings)
        check_same_teacher(ck, ck_path, teacher_sha256)
        load_state(net, ck["net"], ck_path)
        if embed:
            load_state(embed, ck["embed"], ck_path)
        opt.load_state_dict(ck["opt"])
        done, seconds = ck["trajectories"], ck["seconds"]
        pg.restore_state(gen, ck["rng"])
        nfe_gen.set_state(ck["nfe_rng"])
        pg.log(f"resuming {out.name} at {done:,} trajectories")
    elif args.resume:
        pg.log(f"--resume: no checkpoint at {ck_path}, starting from scratch")
    pg.broadcast(net)
    if embed:
        pg.broadcast(embed)

    def checkpoint(finished):
        rng = pg.gather_state(gen.get_state())
        if pg.main:
            save_checkpoint(ck_path, "sfd-student", net_config=net.config, net=net.state_dict(),
                            embed=embed.state_dict() if embed else None, opt=opt.state_dict(), nfes=nfes, afs=afs,
                            t_min=args.t_min, trajectories=done, seconds=seconds, rng=rng, nfe_rng=nfe_gen.get_state(),
                            finished=finished, settings=settings, teacher_sha256=teacher_sha256)

    def update(loss):
        check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pg.sync_grads(params)
        opt.step()

    pg.log(f"{out.name}: student NFE {','.join(map(str, nfes))}, {count_params(net) / 1e6:.2f} M params, teacher "
           f"{'stage-1 Euler+AFS' if second_stage else solver} with K = {K}, {total:,} trajectories, batch {batch}, "
           f"lr {lr:g}, {pg.world} process(es) on {pg.device}")
    stop = min(total, args.stop_after) if args.stop_after is not None else total
    bar = tqdm(total=total, initial=done, unit="traj", disable=not pg.main, desc="sfd")
    t0, next_ckpt = time.time() - seconds, done + cfg["ckpt_every"]
    while done < stop:
        for group in opt.param_groups:                                   # lr/10 after half the run
            group["lr"] = lr if done < total / 2 else lr / 10
        nfe = nfes[torch.randint(len(nfes), (1,), generator=nfe_gen).item()]  # SFD-v: NFE ~ U per iteration
        t = grids[nfe]
        x_T = SIGMA_MAX * torch.randn((local, *shape), generator=gen).to(pg.device)  # Alg. 2 line 1
        with autocast(pg.device):
            x_tilde = teacher_states(D_teach, x_T, fine[nfe], K, solver, afs=second_stage and afs, threshold=threshold)
        cond_fn = (lambda: embed(nfe, local, pg.device)) if embed else (lambda: None)
        _, losses = distill_trajectory(D, x_T, x_tilde, t, update, afs, args.loss, cond_fn)
        done += batch
        seconds = time.time() - t0
        bar.update(batch)
        bar.set_postfix(nfe=nfe, loss=f"{sum(losses) / max(len(losses), 1):.4f}")
        if done >= next_ckpt and done < stop:
            next_ckpt += cfg["ckpt_every"]
            checkpoint(False)
    bar.close()
    pg.check_in_sync(net)
    if embed:
        pg.check_in_sync(embed)
    checkpoint(done >= total)
    if done < total:
        pg.log(f"stopped at {done:,} of {total:,} trajectories; continue with --resume")
        pg.barrier()
        return None

    # Evaluation: Euler (with AFS) over the student grid from x = sigma_max*eps, as the authors sample.
    net.eval()

    def sample_fn(n):
        cond = (lambda b: embed(n, b, pg.device)) if embed else (lambda b: None)
        return lambda eps: sample_euler(lambda x, s: D(x, s, cond(len(x))), SIGMA_MAX * eps, grids[n], afs=afs)

    variant = "sfd-stage2" if second_stage else ("sfd-v" if variable else "sfd")
    all_metrics = [fid.report(args, pg, out / f"nfe{n}" if variable else out, teacher, teacher_path, sample_fn(n), dict(
        method="sfd", variant=variant, nfe=n, train_seconds=seconds, images_seen=done, trajectories=done,
        teacher_solver="euler+afs (stage 1)" if second_stage else solver, teacher_steps_K=K, teacher_threshold=threshold,
        teacher_nfe_per_trajectory=(len(fine[n]) - 1) * TEACHER_SOLVERS[solver][1], t_min=args.t_min, afs=afs,
        loss=args.loss, lr=lr, batch=batch, student_grid=grids[n].tolist()), shape) for n in nfes]
    if variable and pg.main:                         # SFD-v: all NFEs side by side, one row of samples each
        write_json(out / "metrics-all.json", all_metrics)       # each nfe<N>/metrics.json is one row
        eps = PerSampleNoise(EVAL_SEED, range(8), pg.device).randn(*shape)
        with torch.no_grad():
            save_grid(torch.cat([sample_fn(n)(eps) for n in nfes]).clamp(-1, 1), out / "samples.png", nrow=8)
        col = lambda key, fmt: "/".join("n/a" if m.get(key) is None else fmt.format(m[key]) for m in all_metrics)
        print(f"sfd-v {args.dataset} NFE {'/'.join(map(str, nfes))}: student FID {col('fid', '{:.2f}')} vs teacher "
              f"DPM-Solver++(3M) {col('teacher_fid_dpm3m', '{:.2f}')}; teacher_rms student {col('teacher_rms', '{:.4f}')} "
              f"vs teacher {col('teacher_rms_dpm3m', '{:.4f}')}; {seconds / 60:.1f} min, {done:,} trajectories; {out}")
    pg.barrier()
    return all_metrics if variable else all_metrics[0]


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

def bench_step(teacher, preset, device, batch=None):
    """Alg. 2 for one batch of trajectories at NFE 4: the teacher's roll-out and the student's steps with
    their updates, as train() runs them. Unit: trajectories; budget: the preset's SFD length."""
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    net = student_from(teacher.net)
    D, opt = Denoiser(net), torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    t = student_grid(4)
    fine, shape = teacher_grid(t, 4), image_shape(net)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step():
        x_T = SIGMA_MAX * torch.randn((batch, *shape), device=device)                # Alg. 2 line 1
        with autocast(device):
            x_tilde = teacher_states(teacher, x_T, fine, 4, "dpm3m")
        distill_trajectory(D, x_T, x_tilde, t, update)

    return dict(step=step, unit="trajectories", per_step=batch, total=cfg["trajectories"], nets=[teacher.net, net])


def main():
    args = parse_args()
    parse_nfe(args.nfe)                     # bad --nfe: one line before anything is loaded
    pg = Dist(args.device)
    try:
        train(args, pg)
    finally:
        pg.close()


if __name__ == "__main__":
    main_guard(main)
