"""cd.py: Consistency Distillation (CD).

Paper: Yang Song, Prafulla Dhariwal, Mark Chen, Ilya Sutskever, "Consistency Models", ICML 2023,
arXiv:2303.01469. Authors' code: openai/consistency_models_cifar10 (JAX; jcm/losses.py,
configs/cifar10_ve_cd.py) and openai/consistency_models (PyTorch). Spec: ../shared/specs/METHODS.md, 2.

What is implemented (paper Algorithm 2, one iteration):
  - Karras grid of N points (N = 18 on CIFAR-10), sigma_min = eps = 0.002, sigma_max = T = 80,
    rho = 7, written noisiest first as in the authors' code: sigma_0 = T > ... > sigma_{N-1} = eps.
    Draw n ~ U{0..N-2}; t = sigma_n, t2 = sigma_{n+1}; x_t = x0 + t*z.  (The paper numbers the grid
    the other way round: our (t, t2) are its (t_{n+1}, t_n).)
  - The teacher phi moves x_t to t2 with ONE Heun step of the probability-flow ODE (Eq. 6, EDM
    Alg. 1): d = (x_t - D(x_t, t))/t, x' = x_t + (t2 - t)*d, d' = (x' - D(x', t2))/t2,
    x_hat_t2 = x_t + (t2 - t)*(d + d')/2. No gradient.
  - The student is the consistency function (Eq. 5, App. C)
        f(x, s) = c_skip(s)*x + c_out(s)*F(c_in(s)*x, c_noise(s)),
        c_skip = sd^2/((s - eps)^2 + sd^2),  c_out = sd*(s - eps)/sqrt(s^2 + sd^2),
    so f(x, eps) = x exactly (the boundary condition); c_in, c_noise are EDM's, and F starts as a
    copy of the teacher's U-Net (the authors fine-tune from the teacher, training.finetune = True).
  - Loss (Eq. 7), lambda(t_n)*d(f_theta(x_t, t), f_theta-(x_hat_t2, t2)) with the target computed
    without gradient; lambda = 1 in the paper (the lab preset: see the deviations).
    theta- <- mu*theta- + (1 - mu)*theta (Eq. 8); mu = 0 (the authors' CIFAR-10 CD setting,
    stopgrad = True) makes the target the student itself under no_grad. A separate EMA of theta
    (rate 0.9999 in the paper) is the network that samples. theta, theta- and the EMA are all built
    without dropout (consistency_nets), so the target is deterministic whatever the teacher's dropout
    (the paper net's is 0.1): the authors' CD config sets model.dropout = 0, and where dropout is on,
    their code gives the target the student's dropout draw (jcm/losses.py passes the same dropout_rng
    to both calls; cm/karras_diffusion.py, consistency_losses, restores the RNG state before the target).
  - RAdam (the authors' optimizer: no clipping, no weight decay, and no warm-up: configs/cifar10_ve_cd.py
    sets optim.warmup, but jcm/losses.py applies warm-up only in its Adam branch).
  - Sampling (Alg. 1): x = f(T*z, T); then for each re-noising sigma tau:
    x = f(x + sqrt(tau^2 - eps^2)*z', tau). One network call per step, so NFE = 1 + #taus.
    x is clamped to [-1, 1] before each re-noising (--clip, on by default), as the authors' samplers do
    (cm/karras_diffusion.py: karras_sample's denoiser clamps every f output when clip_denoised, which
    stochastic_iterative_sampler then re-noises); Alg. 1 has no clamp (--no-clip). Why the authors'
    way: an x0 outside the data range is never a better estimate, and on the lab student it is no worse
    (FID-500 at NFE 4, the same student: 66.16 with the clamp, 66.53 without; README, "Lab results").

Deviations and why:
  - Distance d: the paper's best CD uses LPIPS, whose VGG weights cannot be downloaded offline
    here. Offered: l2 (mean squared error per image, as the authors' code's "l2") and the
    pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c, c = 0.00054*sqrt(dim) (from the later
    "Improved Techniques for Training Consistency Models", arXiv:2310.14189), the default.
  - The shared EDM teacher of fewstep (a small U-Net) instead of the paper's EDM NCSN++; dropout
    in the student is switched off, as in the authors' CD config (model.dropout = 0).
  - Lab preset: ~600 iterations of batch 32 (the paper: 800k of 512), so lr and the sampling
    EMA rate are scaled for that (see PRESETS).
  - Lab preset: the loss weight lambda(t_n) = 1/(t_n - t_{n+1}) of iCT (arXiv:2310.14189, Sec. 3.1)
    instead of the paper's lambda = 1 (--weighting uniform; the paper and smoke presets keep 1). Why,
    measured on the lab teacher: with lambda = 1 the 600 small-batch steps fix f at large sigma but
    spoil it at small sigma, where the teacher-initialised f was already close to the ODE's endpoint
    (RMS to the teacher's 40-step Heun solution at sigma 0.06: 0.0075 at init, 0.0127 after training),
    and multistep sampling re-noises to small sigmas; 1/(t - t2) weighs those short steps up. With it
    that RMS is lower than at init at every grid sigma (0.06: 0.0029; 1.09: 0.048 against 0.109 at
    init and 0.096 with lambda = 1; 80: 0.211, 0.419, 0.237).
    FID-500 at NFE 4 went from 82.73 to 70.22 with the same re-noising sigmas, to 66.53 with the
    sigmas re-chosen for it (README, "Lab results"). iCT's lognormal draw of n is offered too
    (--n-dist lognormal): alone 71.75, combined with 1/(t - t2) 77.68.
  - Re-noising sigmas (taus) for 3 and 4 steps are not given in the paper for CIFAR-10 (its
    2-step 80 -> 0.585 is sigma_11 of the 18-point grid); the defaults below are points of the
    same grid, chosen by FID on validation noise with the lab student (see DEFAULT_TAUS), the
    way the paper chose its 2-step sigma. Any others: --taus.
  - Evaluation: fid.report's teacher_rms compares with the teacher's deterministic 35-NFE
    samples from the same noise. CD reproduces that deterministic map only at one step; with
    re-noising, later steps draw fresh noise, so at NFE > 1 teacher_rms mixes the first step's
    fidelity with the re-noising's randomness. The one-step student's teacher_rms is therefore
    also reported (onestep_teacher_rms, next to the teacher's own 1-NFE Euler: onestep_teacher_rms_euler).

Outputs: the consistency model does not depend on the NFE (only sampling does), so one run folder
runs/<dataset>/cd-<preset>/ holds the student (student.pt) and each evaluated NFE writes nfe<N>/
(metrics.json, samples.png); `--nfe 2 --resume` after a finished run only samples and evaluates.

Run:
  CPU lab (default):  python cd.py --dataset fashion --nfe 4
  same model, 1 step: python cd.py --dataset fashion --nfe 1 --resume
  CUDA paper:         python cd.py --dataset cifar10 --preset paper --nfe 2 --device cuda
  torchrun:           torchrun --nproc_per_node=2 cd.py --preset smoke
  continue a run:     python cd.py --dataset fashion --nfe 4 --resume
"""
import argparse
import hashlib
import math
import time

import torch
from tqdm import tqdm

import common
import fid
from common import SIGMA_DATA, UserError

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0       # eps, T and rho of the Karras grid (paper App. C)

PRESETS = {
    # iterations: optimizer steps K; batch: global batch; lr: eta of RAdam; N: grid points;
    # mu: target EMA rate (Eq. 8); ema_rate: the sampling EMA; metric: the distance d;
    # weighting: lambda(t_n) of Eq. 7; n_dist: how n is drawn (Alg. 2 line 3).
    "smoke": dict(iterations=8, batch=8, lr=4e-4, N=18, mu=0.0, ema_rate=0.5, metric="pseudo-huber", ckpt_every=4,
                  weighting="uniform", n_dist="uniform"),
    "lab": dict(iterations=600, batch=32, lr=1e-4, N=18, mu=0.0, ema_rate=0.99, metric="pseudo-huber", ckpt_every=100,
                weighting="inv-gap", n_dist="uniform"),             # weighting: iCT's, see the header's deviations
    # The authors' CIFAR-10 CD: batch 512, RAdam lr 4e-4, 800k iterations, mu = 0, EMA 0.9999 (LPIPS -> see header).
    "paper": dict(iterations=800_000, batch=512, lr=4e-4, N=18, mu=0.0, ema_rate=0.9999, metric="pseudo-huber",
                  ckpt_every=5_000, weighting="uniform", n_dist="uniform"),
}
# Re-noising sigmas tau_1 > tau_2 > ... for NFE = 1 + len(taus): indices into the 18-point Karras grid
# [80, 57.6, 40.8, 28.4, 19.4, 12.9, 8.40, 5.32, 3.26, 1.92, 1.09, 0.585, 0.296, 0.140, 0.060, 0.023, 0.0075, 0.002].
# NFE 4: picked as the paper picks its sigmas (by FID), on VALIDATION noise (seed 12345, not the
# evaluation noise) with the lab student (lambda = 1/(t - t2)): FID-500 70.9 for (9, 11, 13) against
# 72.5 for (9, 12, 14), 74.8 for (10, 12, 14), 75.6 for (10, 12, 15), 84.2 for (11, 13, 15). (With the
# paper's lambda = 1, whose f is worse at small sigma, (10, 12, 14) had won: 88.4 against 94.4.)
DEFAULT_TAUS = {1: (), 2: (11,), 3: (9, 12), 4: (9, 11, 13)}
CLIP_DEFAULT = True        # clamp x before re-noising (the authors' samplers); see the header's deviations


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4,
                             nfe_help="student steps = network calls: 1, or 2-4 with the default re-noising sigmas, "
                                      "or 1 + the number of --taus")
    p.add_argument("--N", type=int, default=None, help="N, points of the Karras training grid (paper: 18 on CIFAR-10)")
    p.add_argument("--mu", type=float, default=None, help="mu, EMA rate of the target network theta- (Eq. 8; paper "
                   "CIFAR-10: 0 = stop-gradient of the student)")
    p.add_argument("--ema-rate", type=float, default=None, help="EMA rate of the sampling network (paper: 0.9999)")
    p.add_argument("--lr", type=common.learning_rate, default=None, help="eta, RAdam learning rate (paper: 4e-4)")
    p.add_argument("--iterations", type=int, default=None, help="K, optimizer steps (paper: 800k)")
    p.add_argument("--metric", choices=["l2", "pseudo-huber"], default=None,
                   help="distance d (paper: LPIPS, not available offline; default pseudo-Huber)")
    p.add_argument("--weighting", choices=["uniform", "inv-gap"], default=None, help="lambda(sigma_n) of Eq. 7: "
                   "uniform = 1 (the paper), inv-gap = 1/(sigma_n - sigma_{n+1}) (iCT, arXiv:2310.14189 Sec. 3.1)")
    p.add_argument("--n-dist", choices=["uniform", "lognormal"], default=None, help="how n is drawn: uniform on "
                   "0..N-2 (the paper) or iCT's discretised lognormal in sigma (P_mean -1.1, P_std 2.0, Sec. 3.5)")
    p.add_argument("--taus", type=float, nargs="+", default=None, help="re-noising sigmas tau_1 > tau_2 > ... of "
                   "multistep sampling (Alg. 1), nfe - 1 values in (0.002, 80) (default: see DEFAULT_TAUS)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=CLIP_DEFAULT, help="clamp x to [-1, 1] "
                   "before each re-noising of multistep sampling, as the authors' samplers do (Alg. 1 does not; "
                   f"default {'on' if CLIP_DEFAULT else 'off'}, see the header)")
    args = p.parse_args(argv)
    hp = dict(PRESETS[args.preset])
    for key in ("N", "mu", "ema_rate", "lr", "iterations", "metric", "weighting", "n_dist"):
        if getattr(args, key) is not None:
            hp[key] = getattr(args, key)
    hp["batch"] = args.batch_size or hp["batch"]
    if hp["N"] < 2 or not 0 <= hp["mu"] < 1 or not 0 <= hp["ema_rate"] < 1 or hp["iterations"] < 1 or hp["lr"] <= 0:
        raise UserError("need --N >= 2, 0 <= --mu < 1, 0 <= --ema-rate < 1, --iterations >= 1 and --lr > 0")
    hp["taus"], hp["clip"] = sampling_taus(args.nfe, args.taus), args.clip        # sampling only: not checked on --resume
    return args, hp


def sampling_taus(nfe, taus=None):
    """The re-noising sigmas of an nfe-step sample; UserError for an nfe that cannot be placed."""
    if nfe < 1:
        raise UserError(f"--nfe {nfe}: CD needs at least one network call")
    if taus is None:
        if nfe not in DEFAULT_TAUS:
            raise UserError(f"--nfe {nfe}: CD has default re-noising sigmas for --nfe 1-4 only; "
                            f"pass --taus with {nfe - 1} decreasing values in ({SIGMA_MIN}, {SIGMA_MAX})")
        grid = common.karras_sigmas(18, SIGMA_MIN, SIGMA_MAX, RHO)
        return [round(grid[i].item(), 4) for i in DEFAULT_TAUS[nfe]]
    if len(taus) != nfe - 1:
        raise UserError(f"--nfe {nfe} needs {nfe - 1} re-noising sigmas, --taus gave {len(taus)}")
    if any(not SIGMA_MIN < t < SIGMA_MAX for t in taus) or any(a <= b for a, b in zip(taus, taus[1:])):
        raise UserError(f"--taus must decrease strictly and lie in ({SIGMA_MIN}, {SIGMA_MAX}); got {taus}")
    return list(taus)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

class ConsistencyFunction(torch.nn.Module):
    """f_theta(x, s) = c_skip(s)*x + c_out(s)*F_theta(c_in*x, c_noise)  (Eq. 5, App. C)."""

    def __init__(self, net, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_min, self.sigma_data = net, sigma_min, sigma_data

    def forward(self, x, sigma):
        sigma = common.as_batch(sigma, x)
        eps, sd = self.sigma_min, self.sigma_data
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)            # = 1 at s = eps ...
        c_out = sd * (sigma - eps) / (sigma**2 + sd**2).sqrt()   # ... and 0: f(x, eps) = x exactly
        _, _, c_in, c_noise = common.edm_precond(sigma, sd)      # the teacher's input scaling, so F starts as its copy
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten()).float()


def heun_step(D, x, t, t2):
    """One Heun step of the probability-flow ODE dx/dsigma = (x - D(x, sigma))/sigma from t to t2 > 0
    (Eq. 6 with the Heun update; EDM Alg. 1, lines 5-8)."""
    d = (x - D(x, t)) / t
    x_next = x + (t2 - t) * d                       # Euler step.
    d_prime = (x_next - D(x_next, t2)) / t2
    return x + (t2 - t) * (0.5 * d + 0.5 * d_prime)  # Apply 2nd order correction.


def distance(a, b, metric):
    """d(a, b) per image: 'l2' = mean squared error (authors' code), 'pseudo-huber' = sqrt(|a-b|^2 + c^2) - c
    with c = 0.00054*sqrt(dim) (iCT, Sec. 3.3)."""
    sq = ((a - b) ** 2).flatten(1)
    if metric == "l2":
        return sq.mean(1)
    c = 0.00054 * math.sqrt(sq.shape[1])
    return (sq.sum(1) + c**2).sqrt() - c


def cd_pair(f_target, D, x0, n, z, sigmas):
    """Alg. 2 lines 3-5 for grid indices n (B,) and noise z: (x_t, t, t2, target f_target(x_hat_t2, t2))."""
    t, t2 = sigmas[n].reshape(-1, 1, 1, 1), sigmas[n + 1].reshape(-1, 1, 1, 1)
    x_t = x0 + t * z                                             # Alg. 2 line 4
    with torch.no_grad():                                        # stopgrad: theta- and phi get no gradient
        x_hat_t2 = heun_step(D, x_t, t, t2)                      # Alg. 2 line 5, the teacher phi
        target = f_target(x_hat_t2, t2)
    return x_t, t, t2, target


def weights(n, sigmas, weighting):
    """lambda(t_n) of Eq. 7: 1 (the paper) or iCT's 1/(t - t2), which weighs the short low-noise steps up."""
    if weighting == "uniform":
        return torch.ones(n.shape, device=sigmas.device)
    return 1 / (sigmas[n] - sigmas[n + 1])


def draw_n(N, sigmas, count, gen, n_dist):
    """Alg. 2 line 3: n ~ U{0..N-2}, or iCT's lognormal (Sec. 3.5): p(n) proportional to
    erf((ln t - P_mean)/(sqrt(2) P_std)) - erf((ln t2 - P_mean)/(sqrt(2) P_std)), P_mean = -1.1, P_std = 2."""
    if n_dist == "uniform":
        return torch.randint(0, N - 1, (count,), generator=gen)
    cdf = torch.erf((sigmas.double().cpu().log() + 1.1) / (math.sqrt(2) * 2.0))
    return torch.multinomial((cdf[:-1] - cdf[1:]).float(), count, replacement=True, generator=gen)


def cd_loss(f, f_target, D, x0, n, z, sigmas, metric, weighting="uniform"):
    """L_CD (Eq. 7; Alg. 2 lines 3-7) for grid indices n (B,) and noise z, weighted by lambda(t_n)."""
    x_t, t, _, target = cd_pair(f_target, D, x0, n, z, sigmas)
    return (weights(n, sigmas, weighting) * distance(f(x_t, t), target, metric)).mean()


def training_step(f, f_target, f_ema, opt, D, x0, n, z, sigmas, hp, pg):
    """Alg. 2 lines 6-8: a gradient step on L_CD, the target update (Eq. 8) and the sampling EMA."""
    with common.autocast(pg.device):
        loss = cd_loss(f, f_target, D, x0, n, z, sigmas, hp["metric"], hp["weighting"])
    common.check_finite(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    pg.sync_grads(f.parameters())
    opt.step()
    if f_target is not f:                                        # mu = 0 keeps theta- = theta: nothing to update
        common.ema_update(f_target, f, hp["mu"])
    common.ema_update(f_ema, f, hp["ema_rate"])
    return loss


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
    return lambda eps: sample_cd(f, SIGMA_MAX * eps, taus, renoise_source(eps).randn_like, clip=clip)


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


def train(args, hp, pg, D, data, out):
    """Alg. 2 for hp['iterations'] steps (resumable); returns (sampling network f_ema, seconds, images)."""
    sigmas = common.karras_sigmas(hp["N"], SIGMA_MIN, SIGMA_MAX, RHO).float().to(pg.device)
    f, f_target, f_ema = consistency_nets(D, hp["mu"])
    opt = torch.optim.RAdam(f.parameters(), lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)   # each process its own data and noise
    it, seconds, path = 0, 0.0, out / "student.pt"
    if args.resume and path.exists():
        ck = common.load_checkpoint(path, "cd-student")
        old = {"weighting": "uniform", "n_dist": "uniform", **ck["hp"]}              # checkpoints from before these flags
        changed = ", ".join(f"{k} {old[k]}" for k in ("N", "mu", "ema_rate", "lr", "metric", "batch", "weighting", "n_dist")
                            if old[k] != hp[k])
        if changed:
            raise UserError(f"{path} was trained with other settings ({changed}); use another --out or drop --resume")
        common.check_same_teacher(ck["hp"], path, hp["teacher_sha256"])
        for module, key in ((f, "net"), (f_ema, "ema"), (f_target, "target")):
            if key in ck and (key != "target" or f_target is not f):
                common.load_state(module.net, ck[key], path)
        opt.load_state_dict(ck["opt"])
        it, seconds = ck["iteration"], ck["seconds"]
        pg.restore_state(gen, ck["rng"])
        pg.log(f"resuming CD at iteration {it:,} of {hp['iterations']:,}")
    elif args.resume:
        pg.log(f"--resume: no checkpoint at {path}, starting from scratch")
    for module in (f, f_ema, f_target):
        pg.broadcast(module)
    local = pg.batch(hp["batch"])
    pg.log(f"CD: {args.dataset}, preset {args.preset}, N {hp['N']}, mu {hp['mu']}, EMA {hp['ema_rate']}, "
           f"d = {hp['metric']}, lr {hp['lr']:g}, batch {hp['batch']}, {hp['iterations']:,} iterations, "
           f"{pg.world} process(es) on {pg.device}")

    def save():
        rng = pg.gather_state(gen.get_state())
        if pg.main:
            extra = {"target": f_target.net.state_dict()} if f_target is not f else {}
            common.save_checkpoint(path, "cd-student", net=f.net.state_dict(), ema=f_ema.net.state_dict(),
                                   opt=opt.state_dict(), iteration=it, seconds=time.time() - t0, rng=rng,
                                   net_config=D.net.config, hp=hp, **extra)

    bar = tqdm(total=hp["iterations"], initial=it, unit="it", disable=not pg.main, desc="CD")
    t0 = time.time() - seconds
    while it < hp["iterations"]:
        x0 = common.to_float(common.random_batch(data, local, gen)).to(pg.device)
        n = draw_n(hp["N"], sigmas, local, gen, hp["n_dist"]).to(pg.device)        # Alg. 2 line 3
        z = torch.randn(x0.shape, generator=gen).to(pg.device)
        loss = training_step(f, f_target, f_ema, opt, D, x0, n, z, sigmas, hp, pg)
        it += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if it % hp["ckpt_every"] == 0 or it == hp["iterations"]:
            save()
    bar.close()
    pg.check_in_sync(f_ema)
    return f_ema.eval(), time.time() - t0, it * hp["batch"]


@torch.no_grad()
def onestep_rms(args, pg, teacher, teacher_path, f, shape):
    """teacher_rms of the ONE-step student (and of the teacher's 1-NFE Euler), the deterministic measure."""
    n = fid.FID_SAMPLES[args.preset] if args.fid_samples is None else args.fid_samples
    n, batch = max(n, 64), args.batch_size or 250
    _, ref = fid.teacher_baseline(teacher, teacher_path, args, "dpm3m", fid.REFERENCE_NFE, n, shape, pg.device,
                                    with_fid=False)
    one = fid.generate(lambda eps: f(SIGMA_MAX * eps, SIGMA_MAX), n, shape, batch, pg.device, "student 1 step")
    euler = fid.generate(lambda eps: teacher(SIGMA_MAX * eps, SIGMA_MAX), n, shape, batch, pg.device, "teacher 1 NFE")
    return {"onestep_teacher_rms": fid.rms_distance(one, ref), "onestep_teacher_rms_euler": fid.rms_distance(euler, ref)}


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

def bench_step(teacher, preset, device, batch=None):
    """One iteration of Alg. 2 (training_step: the teacher's Heun step, the target, the student's update,
    the EMAs). Unit: images; budget: the preset's iterations x batch."""
    hp = dict(PRESETS[preset])
    batch = batch or hp["batch"]
    sigmas = common.karras_sigmas(hp["N"], SIGMA_MIN, SIGMA_MAX, RHO).float().to(device)
    f = ConsistencyFunction(common.student_from(teacher.net))
    f_ema = ConsistencyFunction(common.build_net(teacher.net.config)).to(device).requires_grad_(False)
    f_ema.load_state_dict(f.state_dict())
    opt = torch.optim.RAdam(f.parameters(), lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8)
    pg, gen = common.Dist(str(device)), torch.Generator().manual_seed(0)
    shape = common.image_shape(f.net)

    def step():
        x0, z = torch.rand((batch, *shape), device=device) * 2 - 1, torch.randn((batch, *shape), device=device)
        n = draw_n(hp["N"], sigmas, batch, gen, hp["n_dist"]).to(device)
        training_step(f, f, f_ema, opt, teacher, x0, n, z, sigmas, hp, pg)

    return dict(step=step, unit="images", per_step=batch, total=hp["iterations"] * hp["batch"],
                nets=[teacher.net, f.net, f_ema.net])


def main():
    args, hp = parse_args()
    pg = common.Dist(args.device)
    out = common.run_dir(args, f"cd-{args.preset}")                  # the NFE only changes sampling: nfe<N>/
    common.check_exports(args, out / f"nfe{args.nfe}")
    common.seed_all(args.seed)
    data, _ = common.load_dataset(args.dataset, args.data_dir)
    D, teacher_path = common.load_teacher(args, pg)
    common.require_arch(D.net, ("fewstep", "edm-songunet"), "CD's consistency function (Eq. 5) reuses the "
                        "teacher's EDM preconditioning F(c_in*x, c_noise)")
    common.check_data_shape(data, D, args.dataset)
    hp["teacher_sha256"] = common.fingerprint(teacher_path)          # saved in student.pt, checked on --resume
    f_ema, seconds, images = train(args, hp, pg, D, data, out)
    info = dict(method="cd", variant=f"cd-{hp['metric']}", nfe=args.nfe, train_seconds=seconds, images_seen=images,
                taus=hp["taus"], N=hp["N"], mu=hp["mu"], ema_rate=hp["ema_rate"], lr=hp["lr"], batch=hp["batch"],
                iterations=hp["iterations"], weighting=hp["weighting"], n_dist=hp["n_dist"], clip=hp["clip"])
    if args.nfe > 1 and pg.main:
        info.update(onestep_rms(args, pg, D, teacher_path, f_ema, data.shape[1:]))
    fid.report(args, pg, out / f"nfe{args.nfe}", D, teacher_path, make_sampler(f_ema, hp["taus"], hp["clip"]), info, data.shape[1:])
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
