"""cd.py: Consistency Distillation (CD) of the shared teacher: Song, Dhariwal, Chen, Sutskever, "Consistency
Models", ICML 2023, arXiv:2303.01469 (authors' code: openai/consistency_models, openai/consistency_models_cifar10).

Run (one run folder runs/<dataset>/cd-<preset>/: student.pt, and nfe<N>/ per evaluated NFE):
  CPU lab (default):  python cd.py --dataset fashion --nfe 4
  same model, 1 step: python cd.py --dataset fashion --nfe 1 --resume     # the model does not depend on the NFE
  CUDA paper:         python cd.py --dataset cifar10 --preset paper --nfe 2 --device cuda
  torchrun:           torchrun --nproc_per_node=2 cd.py --preset smoke
  continue a run:     python cd.py --dataset fashion --nfe 4 --resume

What is implemented
- Alg. 2 (cd_loss) on the N-point Karras grid, noisiest first as in the authors' code (sigma_0 = T = 80 > ... >
  sigma_{N-1} = eps = 0.002; our (t, t2) are the paper's (t_{n+1}, t_n)): one Heun step of the teacher (Eq. 6)
  and the loss lambda(t_n) d(f_theta(x_t, t), f_theta-(x_hat_t2, t2)) (Eq. 7), the target without gradient.
- The consistency function f = c_skip x + c_out F (Eq. 5, App. C), f(x, eps) = x exactly; F starts as the
  teacher's U-Net (training.finetune), theta, theta- and the sampling EMA all without dropout (the authors' CD config).
- theta- <- mu theta- + (1 - mu) theta (Eq. 8; mu = 0, stopgrad, in the authors' CIFAR-10 CD); a separate EMA
  samples; RAdam without clipping, weight decay or warm-up (jcm/losses.py warms up only Adam).
- Training images flipped left-right at random (--xflip, on: consistency_models_cifar10 configs/
  default_cifar10_configs.py data.random_flip = True, applied in jcm/datasets.py).
- Sampling (Alg. 1): x = f(T z, T), then x = f(x + sqrt(tau^2 - eps^2) z', tau) for each tau: NFE = 1 + #taus;
  x clamped to [-1, 1] before each re-noising, as the authors' samplers do (--no-clip: Alg. 1's way).
- Also reported: the one-step student's teacher_rms (re-noising mixes fresh noise into it at NFE > 1).

Deviations
- d: pseudo-Huber (iCT, arXiv:2310.14189, Sec. 3.3; the default) or l2; the paper's LPIPS needs VGG weights.
- The shared fewstep teacher (a small U-Net), not the paper's EDM NCSN++.
- Lab preset: 600 iterations of batch 32 (paper: 800k of 512), so lr and EMA rate are scaled; and iCT's weight
  lambda(t_n) = 1/(t_n - t_{n+1}) (Sec. 3.1) instead of 1: with 1 the short run spoils f at small sigma
  (README, "Lab results"). --n-dist lognormal: iCT's draw of n (Sec. 3.5).
- Re-noising sigmas for 3-4 steps (not in the paper for CIFAR-10): grid points chosen by FID on validation
  noise, as the paper chose its 2-step sigma (DEFAULT_TAUS); any others: --taus.
"""
import argparse
import functools
import hashlib
import math

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import torch

import fid
import pd

SIGMA_MIN, SIGMA_MAX, RHO = common.SIGMA_MIN, common.SIGMA_MAX, common.RHO   # eps, T and rho of the Karras grid (paper App. C)

PRESETS = {
    # iterations: optimizer steps K; batch: global batch; lr: eta of RAdam; N: grid points;
    # mu: target EMA rate (Eq. 8); ema_rate: the sampling EMA; metric: the distance d;
    # weighting: lambda(t_n) of Eq. 7; n_dist: how n is drawn (Alg. 2 line 3); ckpt_every: iterations.
    "smoke": dict(iterations=8, batch=8, lr=4e-4, N=18, mu=0.0, ema_rate=0.5, metric="pseudo-huber", ckpt_every=4,
                  weighting="uniform", n_dist="uniform"),
    "lab": dict(iterations=600, batch=32, lr=1e-4, N=18, mu=0.0, ema_rate=0.99, metric="pseudo-huber", ckpt_every=100,
                weighting="inv-gap", n_dist="uniform"),             # weighting: iCT's, see the header's deviations
    # The authors' CIFAR-10 CD: batch 512, RAdam lr 4e-4, 800k iterations, mu = 0, EMA 0.9999 (LPIPS -> see header).
    "paper": dict(iterations=800_000, batch=512, lr=4e-4, N=18, mu=0.0, ema_rate=0.9999, metric="pseudo-huber",
                  ckpt_every=5_000, weighting="uniform", n_dist="uniform"),
}
# Re-noising sigmas tau_1 > tau_2 > ... for NFE = 1 + len(taus): indices into the 18-point Karras grid, the grid's
# values exactly (the authors index it: openai/consistency_models cm/karras_diffusion.py stochastic_iterative_sampler)
# [80, 57.6, 40.8, 28.4, 19.4, 12.9, 8.40, 5.32, 3.26, 1.92, 1.09, 0.585, 0.296, 0.140, 0.060, 0.023, 0.0075, 0.002].
# 2 steps: the paper's sigma_11 = 0.585. 4 steps: picked as the paper picks its sigmas (by FID), on VALIDATION
# noise (seed 12345, not the evaluation noise) with the lab student, among (9, 11, 13), (9, 12, 14), (10, 12, 14),
# (10, 12, 15) and (11, 13, 15) (the figures: README).
DEFAULT_TAUS = {1: (), 2: (11,), 3: (9, 12), 4: (9, 11, 13)}
CLIP_DEFAULT = True        # clamp x before re-noising (the authors' samplers); see the header


def one_of(*names):
    """An argparse type= for a preset flag with a fixed set of values."""
    return common.checked(str, lambda v: v in names, " or ".join(names))


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4, presets=PRESETS, paper_cost=PAPER_COST,
                             nfe_help="student steps = network calls: 1, or 2-4 with the default re-noising sigmas, "
                                      "or 1 + the number of --taus")
    common.preset_flag(p, "N", int, "N, points of the Karras training grid")
    common.preset_flag(p, "mu", float, "mu, EMA rate of the target network theta- (Eq. 8; 0 = stop-gradient of "
                       "the student, the authors' CIFAR-10 setting)")
    common.preset_flag(p, "ema_rate", float, "EMA rate of the sampling network")
    common.preset_flag(p, "lr", common.learning_rate, "eta, RAdam learning rate")
    common.preset_flag(p, "iterations", int, "K, optimizer steps")
    common.preset_flag(p, "metric", one_of("l2", "pseudo-huber"), "distance d: l2 or pseudo-huber (the paper's "
                       "LPIPS is not available offline)")
    common.preset_flag(p, "weighting", one_of("uniform", "inv-gap"), "lambda(sigma_n) of Eq. 7: uniform = 1 (the "
                       "paper), inv-gap = 1/(sigma_n - sigma_{n+1}) (iCT, arXiv:2310.14189 Sec. 3.1)")
    common.preset_flag(p, "n_dist", one_of("uniform", "lognormal"), "how n is drawn: uniform on 0..N-2 (the paper) "
                       "or lognormal, iCT's discretised lognormal in sigma (P_mean -1.1, P_std 2.0, Sec. 3.5)")
    p.add_argument("--taus", type=float, nargs="+", default=None, help="re-noising sigmas tau_1 > tau_2 > ... of "
                   "multistep sampling (Alg. 1), nfe - 1 values in (0.002, 80) (default: see DEFAULT_TAUS)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=True, help="flip each training image "
                   "left-right with probability 1/2 (the authors' CIFAR-10 random_flip; default on)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=CLIP_DEFAULT, help="clamp x to [-1, 1] "
                   "before each re-noising of multistep sampling, as the authors' samplers do (Alg. 1 does not; "
                   f"default {'on' if CLIP_DEFAULT else 'off'}, see the header)")
    args = p.parse_args(argv)
    if args.N < 2 or not 0 <= args.mu < 1 or not 0 <= args.ema_rate < 1 or args.iterations < 1 or args.lr <= 0:
        raise common.UserError("need --N >= 2, 0 <= --mu < 1, 0 <= --ema-rate < 1, --iterations >= 1 and --lr > 0")
    args.taus = sampling_taus(args.nfe, args.taus)          # sampling only: not checked on --resume
    return args


def sampling_taus(nfe, taus=None):
    """The re-noising sigmas of an nfe-step sample; UserError for an nfe that cannot be placed."""
    if nfe < 1:
        raise common.UserError(f"--nfe {nfe}: CD needs at least one network call")
    if taus is None:
        if nfe not in DEFAULT_TAUS:
            raise common.UserError(f"--nfe {nfe}: CD has default re-noising sigmas for --nfe 1-4 only; "
                            f"pass --taus with {nfe - 1} decreasing values in ({SIGMA_MIN}, {SIGMA_MAX})")
        grid = common.karras_sigmas(18, SIGMA_MIN, SIGMA_MAX, RHO)
        return [grid[i].item() for i in DEFAULT_TAUS[nfe]]
    if len(taus) != nfe - 1:
        raise common.UserError(f"--nfe {nfe} needs {nfe - 1} re-noising sigmas, --taus gave {len(taus)}")
    if any(not SIGMA_MIN < t < SIGMA_MAX for t in taus) or any(a <= b for a, b in zip(taus, taus[1:])):
        raise common.UserError(f"--taus must decrease strictly and lie in ({SIGMA_MIN}, {SIGMA_MAX}); got {taus}")
    return list(taus)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

class ConsistencyFunction(torch.nn.Module):
    """f_theta(x, s) = c_skip(s)*x + c_out(s)*F_theta(c_in*x, c_noise)  (Eq. 5, App. C)."""

    def __init__(self, net, sigma_min=SIGMA_MIN, sigma_data=common.SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_min, self.sigma_data = net, sigma_min, sigma_data

    def forward(self, x, sigma):
        sigma = common.as_batch(sigma, x)
        eps, sd = self.sigma_min, self.sigma_data
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)            # = 1 at s = eps ...
        c_out = sd * (sigma - eps) / (sigma**2 + sd**2).sqrt()   # ... and 0: f(x, eps) = x exactly
        _, _, c_in, c_noise = common.edm_precond(sigma, sd)      # the teacher's input scaling, so F starts as its copy
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten()).float()


def consistency_nets(D, mu):
    """(f_theta, f_theta-, f_ema), all initialised to the teacher's U-Net (training.finetune = True) and all
    without dropout (the authors' CD config: model.dropout = 0), so the target f_theta-(x_hat_t2, t2) is
    deterministic. mu = 0: theta- is theta itself (stopgrad)."""
    f = ConsistencyFunction(common.student_from(D.net))
    for m in f.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    copy = lambda: ConsistencyFunction(common.build_net(D.net.config, dropout=0.0)).to(next(f.parameters()).device)
    f_ema = copy().requires_grad_(False)
    f_ema.load_state_dict(f.state_dict())
    f_target = f
    if mu > 0:                                                   # theta- as its own network, initialised to theta
        f_target = copy().requires_grad_(False)
        f_target.load_state_dict(f.state_dict())
    return f, f_target, f_ema


def cd_pair(f_target, D, x0, n, z, sigmas):
    """Alg. 2 lines 4-6 for grid indices n (B,) and noise z: (x_t, t, t2, the target f_target(x_hat_t2, t2)); cd_loss's
    and sferd.py's CD terms."""
    t, t2 = sigmas[n].reshape(-1, 1, 1, 1), sigmas[n + 1].reshape(-1, 1, 1, 1)   # the paper's t_{n+1}, t_n
    x_t = x0 + t * z                                                      # line 4: x_t ~ N(x0, t^2 I)
    with torch.no_grad():                                                # stopgrad: phi and theta- get no gradient
        x_hat_t2 = heun_step(D, x_t, t, t2)                              # line 5: the teacher phi's ODE step t -> t2
        target = f_target(x_hat_t2, t2)                                  # line 6: f_theta-(x_hat_t2, t2)
    return x_t, t, t2, target


def cd_loss(f, D, x0, gen, *, f_target, sigmas, metric, weighting="uniform", n_dist="uniform", xflip=False):
    """Alg. 2, lines 3-6, for a batch x0 (line 3's x ~ data, drawn by train_loop): the loss L(theta, theta-; phi)
    of the consistency function f = f_theta, with the teacher phi = D and the target network f_target = f_theta-
    (f itself when mu = 0). sigmas: the N-point grid, noisiest first. Lines 7-8 are train_loop's (ema_updates).
    Draws from gen: the flips (xflip, pd.random_xflip: first, as in pd.pd_loss), n, then z."""
    if xflip:
        x0 = pd.random_xflip(x0, gen)                                     # the authors' random_flip
    n = draw_n(len(sigmas), sigmas, len(x0), gen, n_dist).to(x0.device)  # line 3: n ~ U[[1, N-1]] (here 0..N-2)
    z = torch.randn(x0.shape, generator=gen).to(x0.device)
    x_t, t, _, target = cd_pair(f_target, D, x0, n, z, sigmas)          # lines 4-6: x_t, the teacher's step, the target
    lam = weights(n, sigmas, weighting)                                  # lambda(t_n) d(f_theta(x_t, t), f_theta-(...))
    return (lam * distance(f(x_t, t), target, metric)).mean()


def ema_updates(f, f_target, f_ema, mu, ema_rate):
    """train_loop's emas after each step of theta (Alg. 2 line 7): line 8, theta- <- mu theta- + (1 - mu) theta
    (Eq. 8; nothing to do when mu = 0 keeps theta- = theta), then the sampling EMA."""
    return ([(f_target, f, mu)] if f_target is not f else []) + [(f_ema, f, ema_rate)]


def draw_n(N, sigmas, count, gen, n_dist):
    """Alg. 2 line 3: n ~ U{0..N-2}, or iCT's lognormal (Sec. 3.5): p(n) proportional to
    erf((ln t - P_mean)/(sqrt(2) P_std)) - erf((ln t2 - P_mean)/(sqrt(2) P_std)), P_mean = -1.1, P_std = 2."""
    if n_dist == "uniform":
        return torch.randint(0, N - 1, (count,), generator=gen)
    cdf = torch.erf((sigmas.double().cpu().log() + 1.1) / (math.sqrt(2) * 2.0))
    return torch.multinomial((cdf[:-1] - cdf[1:]).float(), count, replacement=True, generator=gen)


def heun_step(D, x, t, t2):
    """One Heun step of the probability-flow ODE dx/dsigma = (x - D(x, sigma))/sigma from t to t2 > 0
    (Eq. 6 with the Heun update; EDM Alg. 1, lines 5-8)."""
    d = (x - D(x, t)) / t
    x_next = x + (t2 - t) * d                       # Euler step.
    d_prime = (x_next - D(x_next, t2)) / t2
    return x + (t2 - t) * (0.5 * d + 0.5 * d_prime)  # Apply 2nd order correction.


def weights(n, sigmas, weighting):
    """lambda(t_n) of Eq. 7: 1 (the paper) or iCT's 1/(t - t2), which weighs the short low-noise steps up."""
    if weighting == "uniform":
        return torch.ones(n.shape, device=sigmas.device)
    return 1 / (sigmas[n] - sigmas[n + 1])


def pseudo_huber(a, b):
    """sqrt(|a-b|^2 + c^2) - c per image, c = 0.00054*sqrt(dim) (iCT, arXiv:2310.14189, Sec. 3.3); sfd.py's too."""
    sq = ((a - b) ** 2).flatten(1)
    c = 0.00054 * math.sqrt(sq.shape[1])
    return (sq.sum(1) + c**2).sqrt() - c


def distance(a, b, metric):
    """d(a, b) per image: 'l2' = mean squared error (authors' code), 'pseudo-huber' (iCT's, pseudo_huber)."""
    if metric == "l2":
        return ((a - b) ** 2).flatten(1).mean(1)
    return pseudo_huber(a, b)


@torch.no_grad()
def sample_cd(f, x, taus, noise, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, callback=None, clip=False):
    """Multistep consistency sampling (Alg. 1): x = f(x_T, T), then for each tau:
    x_hat = x + sqrt(tau^2 - eps^2)*z (re-noise to the marginal at tau), x = f(x_hat, tau).
    x starts at T (x_T = T*z); noise(x) draws z; callback(i, x_hat) sees each re-noised state.
    clip: x clamped to [-1, 1] before each re-noising, as the authors' samplers do (Alg. 1 does not)."""
    x = f(x, sigma_max)
    for i, tau in enumerate(taus):
        if clip:
            x = x.clamp(-1, 1)
        x_hat = x + math.sqrt(tau**2 - sigma_min**2) * noise(x)
        if callback:
            callback(i, x_hat)
        x = f(x_hat, tau)
    return x


def renoise_source(eps, seed=common.EVAL_SEED):
    """Per-sample re-noising noise seeded by each sample's own starting noise: sample k gets the same
    samples whatever the batch size, the batch order or the number of processes (sferd.py: another seed)."""
    keys = [int.from_bytes(hashlib.sha1(e.cpu().numpy().tobytes()).digest()[:6], "big") for e in eps]
    return common.PerSampleNoise(seed, keys, eps.device)


def make_sampler(f, taus, clip=False):
    """sample_fn for fid.report: unit noise -> images (x_T = T*eps), with re-noising that ignores batching."""
    return lambda eps: sample_cd(f, SIGMA_MAX * eps, taus, renoise_source(eps).ahead(len(taus), *eps.shape[1:]), clip=clip)


@torch.no_grad()
def onestep_rms(ev, pg, teacher, teacher_path, f, shape):
    """teacher_rms of the ONE-step student (and of the teacher's 1-NFE Euler), the deterministic measure; every
    process makes its share of the samples (fid.generate)."""
    n, batch = fid.rms_n(ev.preset, ev.fid_samples), ev.batch_size or 250
    _, ref = fid.teacher_baseline(teacher, teacher_path, ev, "dpm3m", fid.REFERENCE_NFE, n, shape, pg.device,
                                  with_fid=False, pg=pg)
    one = fid.generate(lambda eps: f(SIGMA_MAX * eps, SIGMA_MAX), n, shape, batch, pg.device, "student 1 step", pg,
                       ev.bf16_eval)
    euler = fid.generate(lambda eps: teacher(SIGMA_MAX * eps, SIGMA_MAX), n, shape, batch, pg.device, "teacher 1 NFE", pg)
    return {"onestep_teacher_rms": fid.rms_distance(one, ref), "onestep_teacher_rms_euler": fid.rms_distance(euler, ref)}


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

# The paper preset's cost, which a paper run on a machine without CUDA is refused with at once: FLOPs of
# one image of Alg. 2 (the teacher's Heun step, the target, the student), counted on the meta device by `python common.py flops`
# (tests/test_distributed.py counts them again), and the units in the preset's budget (bench_step's total).
PAPER_COST = dict(unit="images", units=409_600_000, flops_per_unit=2.543e11)


def bench_step(teacher, preset, device, batch=None):
    """One iteration of Alg. 2 (cd_loss: the teacher's Heun step, the target, the loss; then common.optimizer_steps:
    the student's update and ema_updates). Unit: images; budget: the preset's iterations x batch."""
    hp = PRESETS[preset]
    batch = batch or hp["batch"]
    sigmas = common.karras_sigmas(hp["N"], SIGMA_MIN, SIGMA_MAX, RHO).float().to(device)
    f, f_target, f_ema = consistency_nets(teacher, hp["mu"])
    opt = torch.optim.RAdam(f.parameters(), lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8)
    pg, gen, shape = common.Dist(str(device)), torch.Generator().manual_seed(0), common.image_shape(f.net)
    loss = functools.partial(cd_loss, f_target=f_target, sigmas=sigmas, metric=hp["metric"],
                             weighting=hp["weighting"], n_dist=hp["n_dist"])
    emas = ema_updates(f, f_target, f_ema, hp["mu"], hp["ema_rate"])

    def step():
        x0 = torch.rand((batch, *shape), device=device) * 2 - 1
        with common.autocast(device):
            out = loss(f, teacher, x0, gen)
        common.optimizer_steps(pg, out, opt, list(f.parameters()), emas=emas)

    return dict(step=step, unit="images", per_step=batch, total=hp["iterations"] * hp["batch"],
                nets=[teacher.net, f.net, f_ema.net])


def main():
    args = parse_args()
    pg = common.Dist(args.device, args.compile, args.channels_last)
    out = common.run_dir(args.out, args.dataset, f"cd-{args.preset}")   # the NFE only changes sampling: nfe<N>/
    ev = common.Eval.of(args)
    fid.check_exports(ev, out / f"nfe{args.nfe}")
    data, D, teacher_path = common.load_inputs(ev, pg, args.seed, ("fewstep", "edm-songunet"), "CD's consistency "
                                               "function (Eq. 5) reuses the teacher's EDM preconditioning F(c_in*x, c_noise)")

    # Training (boilerplate around Alg. 2): cd_loss through the shared loop, resumable from student.pt.
    sigmas = common.karras_sigmas(args.N, SIGMA_MIN, SIGMA_MAX, RHO).float().to(pg.device)
    f, f_target, f_ema = consistency_nets(D, args.mu)                 # Alg. 2 line 1: theta- <- theta
    opt = torch.optim.RAdam(f.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)   # each process its own data and noise
    path = out / "student.pt"
    resume = common.resume_from(path, "cd-student", args.resume, pg)
    settings = {k: getattr(args, k) for k in ("N", "mu", "ema_rate", "lr", "metric", "batch", "weighting", "n_dist",
                                              "xflip")}
    settings["teacher_sha256"] = common.fingerprint(teacher_path)    # checked on --resume
    nets = dict(net=f.net, ema=f_ema.net, **({"target": f_target.net} if f_target is not f else {}))
    pg.log(f"CD: {args.dataset}, preset {args.preset}, N {args.N}, mu {args.mu}, EMA {args.ema_rate}, "
           f"d = {args.metric}, lr {args.lr:g}, batch {args.batch}, {args.iterations:,} iterations, "
           f"{pg.world} process(es) on {pg.device}")
    loss = functools.partial(cd_loss, f_target=f_target, sigmas=sigmas, metric=args.metric, weighting=args.weighting,
                             n_dist=args.n_dist, xflip=args.xflip)
    budget = common.Budget(args.iterations, "updates", args.batch, args.lr, args.ckpt_every)
    run = common.train_loop(pg, loss, data, f, D, opt, budget, common.Run(
        path, "cd-student", settings, nets, gen, emas=ema_updates(f, f_target, f_ema, args.mu, args.ema_rate),
        resume=resume, desc="CD"))
    f_ema.eval()

    info = dict(method="cd", variant=f"cd-{args.metric}", nfe=args.nfe, train_seconds=run["seconds"],
                images_seen=run["images"], taus=args.taus, N=args.N, mu=args.mu, ema_rate=args.ema_rate, lr=args.lr,
                batch=args.batch, iterations=args.iterations, weighting=args.weighting, n_dist=args.n_dist,
                xflip=args.xflip, clip=args.clip)
    if args.nfe > 1:
        info.update(onestep_rms(ev, pg, D, teacher_path, f_ema, data.shape[1:]))
    fid.report(ev, pg, out / f"nfe{args.nfe}", D, teacher_path, make_sampler(f_ema, args.taus, args.clip), info,
               data.shape[1:], student=f_ema, curves=[common.curve_of("CD", run)])
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
