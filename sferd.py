"""sferd.py: SFERD, Spatial Fitting-Error Reduction Distillation (Zhou et al., "Reducing Spatial Fitting Error in Distillation
of Denoising Diffusion Models", AAAI 2024, arXiv:2311.03830) on PD or CD: an attention-guided teacher + a semantic
gradient predictor.

  python sferd.py --dataset fashion --nfe 4 --base pd          # CPU lab (+ --no-guidance --no-predictor: its base)
  python sferd.py --dataset cifar10 --preset paper --base cd --nfe 1 --device cuda
  torchrun --nproc_per_node=2 sferd.py --preset smoke
  python sferd.py --nfe 4 --no-predictor --w 0.5 --blur-sigma 1 --out runs/fashion/sferd-abl     # an ablation

What is implemented (Alg. 1-2, Sec. 4, App. B; authors' partial code: Sainzerjj/SFERD):
  - Alg. 1 in alg1_pd / alg1_cd. Lines 8-13, attention guidance (guided): psi = 1[A > k] of the attention A each position
    of a decoder block receives, upsampled (Eq. 10), a Gaussian blur, the guided x0 (Eq. 11), in the EDM view x = z/alpha.
    Lines 15-16: the base's target from it, "t-1" the teacher's step (PD: n DDIM steps per student step, t - 1/(nN); CD:
    the next grid point). Lines 17-18: z_sem = E_phi(x0), w(lambda_t)*|(s_{t-1}^2/alpha_{t-1})*G_tau - (x0_target -
    x0_student)|^2; G_tau reuses the student's encoder.
  - Phases (main): the base with the guided teacher (PD: pd.pd_loss, halving or Table 6's two stages start -> M -> nfe;
    CD: cd.cd_loss); E_phi, G_tau, the student frozen for half of --pred-iters, then joint (Sec. 4.2); a latent DDPM over
    normalised z_sem (Table 4). --resume continues each phase.
  - Sampling (Alg. 2): x0~ = x0_theta + c*G_tau, then the base's step. Ablations: --no-guidance, --no-predictor (both: the base).

Deviations (why; Sainzerjj/SFERD's training code raises TypeError in two places, so fewstep follows the paper and lists
where that code, diffusion/gaussian_diffusion.py distill_losses_enc, differs):
  - The shared EDM teacher (common.py), not ADM / NCSN++; AdaGN keeps common.UNet's (1+z_s)*GN(h)+z_b, not Eq. 15's.
  - --g-scale train (default) scales G by s_{t-1}^2/alpha_{t-1}, what line 18 trains; Alg. 2's c_t = s_t (--g-scale paper)
    adds s_t^2/alpha_t*G, ~2e4*G at PD's first step.
  - Eq. 11 guides x0; the authors guide eps (eps_attn + w_g*(eps_hat - eps_attn): SAG's form for w_g = 1 + w) and re-derive
    x0 (--guidance-space eps): Eq. 11's x0 less w*psi*(x0_hat - B(x0_hat)). They call the teacher once, at q_sample(x0,
    t-1) with z_t's noise (not n DDIM steps from z_t), and clip its x0 before the blur and the student's x0 in line 18.
  - SFERD-PD: t on the student's grid (their train_utils.py); PD's truncated-SNR weight, not their 1 + SNR inside the
    square ((1 + SNR)^2); paper batch 128 (App. B.1 gives none), clip 1. SFERD-CD: CD's own target.
  - No preset flips images (their scripts/image_datasets.py does). Lab/smoke: the bases' budgets (equal cost), SFERD-PD
    lab from 16 steps; lab w = 0.1, not 0.3 (README); a 64-d z_sem, a 4 x 256 latent MLP with EMA 0.995; the predictor's
    length and joint lr are fewstep's choice.
"""
import copy
import math

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import torch
import torch.nn as nn
import torch.nn.functional as F

import cd
import fid
import pd

PRESETS = {   # w (Eq. 11); z_dim: of z_sem; pred_*: the predictor's updates, batch, lr and the student's lr when joint;
    # latent_*: the latent DDPM (Table 4); ckpt_every: updates between checkpoints, every phase.
    "smoke": dict(w=0.3, z_dim=8, pred_iters=4, pred_batch=8, pred_lr=2e-4, joint_lr=2e-5, latent_layers=2, latent_hidden=32,
                  latent_iters=10, latent_batch=16, latent_lr=1e-3, latent_ema=0.5, latent_steps=5, ckpt_every=2),
    "lab": dict(w=0.1, z_dim=64, pred_iters=100, pred_batch=32, pred_lr=2e-4, joint_lr=2e-5, latent_layers=4, latent_hidden=256,
                latent_iters=2000, latent_batch=256, latent_lr=1e-3, latent_ema=0.995, latent_steps=50, ckpt_every=50),
    # App. B: Adam 2e-4 (PD) for G_tau/E_phi; Table 4: 10 x 2048 MLP, batch 512, lr 1e-4, EMA 0.9999; 512-d z_sem.
    "paper": dict(w=0.3, z_dim=512, pred_iters=50_000, pred_batch=128, pred_lr=2e-4, joint_lr=2e-5, latent_layers=10,
                  latent_hidden=2048, latent_iters=100_000, latent_batch=512, latent_lr=1e-4, latent_ema=0.9999,
                  latent_steps=100, ckpt_every=5_000),
}
PD = dict(later_factor=1.0, later_steps=2, grad_clip=1.0)                 # pd.py's, in every preset
BASES = {   # the base's settings by --base and preset: pd.py's / cd.py's in smoke and lab (SFERD-PD lab from 16 steps).
    # PD: iters per stage; schedule "halving" (n = 2) or "two-stage" (Table 6); lr_schedule "anneal" (PD's) or "constant".
    "pd": {"smoke": dict(PD, start_steps=8, iters=3, batch=8, lr=1e-4, schedule="halving", lr_schedule="anneal"),
           "lab": dict(PD, start_steps=16, iters=300, batch=32, lr=2e-4, schedule="halving", lr_schedule="anneal"),
           # App. B.1: from 1024 steps in two stages, Adam at a constant 2e-4, 32M images per stage (Table 6), batch 128.
           "paper": dict(PD, start_steps=1024, iters=250_000, batch=128, lr=2e-4, schedule="two-stage", lr_schedule="constant")},
    # CD (cd.py's keys): iters in all, N grid points, mu (Eq. 8), the sampling EMA, the distance d, lambda(t_n).
    "cd": {"smoke": dict(iters=8, batch=8, lr=4e-4, N=18, mu=0.0, ema_rate=0.5, metric="pseudo-huber", weighting="uniform"),
           "lab": dict(iters=600, batch=32, lr=1e-4, N=18, mu=0.0, ema_rate=0.99, metric="pseudo-huber", weighting="inv-gap"),
           # Table 3 (CIFAR-10): the l2 metric (Sec. 6.2), a 40-step Heun teacher grid, RAdam 2e-4, batch 256, mu = 0,
           # EMA 0.9999, 32M images = 125k iterations, lambda = 1 as in the CD paper.
           "paper": dict(iters=125_000, batch=256, lr=2e-4, N=40, mu=0.0, ema_rate=0.9999, metric="l2", weighting="uniform")},
}
LATENT_ALPHA_BAR = common.ddpm_alpha_bar(1000, 0.008, 0.008)[1:].float()     # Table 4: T = 1000, constant beta


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4, presets=PRESETS, paper_cost=PAPER_COST,
                             nfe_help="student steps (PD: power of two below --start-steps; CD: 1-4 or 1 + len(--taus))")
    p.add_argument("--base", choices=["pd", "cd"], default="pd", help="base distiller: SFERD-PD or SFERD-CD (default pd)")
    p.add_argument("--no-guidance", action="store_true", help="ablation: plain teacher (no attention guidance)")
    p.add_argument("--no-predictor", action="store_true", help="ablation: no E_phi / G_tau / latent DDPM")
    p.add_argument("--k", type=float, default=1.0, help="k, mask threshold psi = 1[A > k] (Eq. 10; paper 1.0)")
    common.preset_flag(p, "w", float, "w, attention guidance strength (Eq. 11; paper 0.3)")
    p.add_argument("--guidance-space", choices=["x0", "eps"], default="x0", help="guide x0 as Eq. 11 (default) or eps as "
                   "the authors' code, x0 re-derived (see the header)")
    p.add_argument("--blur-sigma", type=float, default=3.0, help="sigma of the Gaussian blur B (paper 3)")
    p.add_argument("--blur-size", type=int, default=15, help="kernel size of B (authors' code 15)")
    p.add_argument("--attn-block", help="teacher attention block of A (default: the highest-resolution decoder one)")
    p.add_argument("--g-scale", choices=["train", "paper"], default="train", help="sampling scale of G_tau: 'train' = "
                   "Alg. 1 line 18's s_{t-1}^2/alpha_{t-1}, 'paper' = Alg. 2's s_t")
    p.add_argument("--g-drop", type=float, default=0.0, help="drop G_tau on this last fraction of steps (authors' code 0.3)")
    p.add_argument("--start-steps", type=int, help="PD: DDIM steps of the original teacher (default: lab 16, paper 1024)")
    p.add_argument("--schedule", choices=["halving", "two-stage"], help="PD: halving stages (n = 2, PD's) or the paper's "
                   "two, n = teacher steps / student steps (Table 6: 1024 -> 32 -> 1; default: lab halving, paper two-stage)")
    p.add_argument("--iters", type=int, help="base updates (PD: per stage, lab 300, paper 250k; CD: lab 600, paper 125k)")
    p.add_argument("--lr", type=common.learning_rate, help="base lr (PD 2e-4, constant in paper; CD lab 1e-4, paper 2e-4)")
    p.add_argument("--taus", type=float, nargs="+", help="CD: re-noising sigmas (see cd.py)")
    common.preset_flag(p, "pred_iters", int, "predictor updates, the student frozen for the first half")
    common.preset_flag(p, "latent_iters", int, "updates of the latent DDPM over z_sem (Table 4: 100k)")
    args = p.parse_args(argv)
    common.fill_presets(args, BASES[args.base])              # the base's settings, unless given
    if not 0 <= args.g_drop < 1 or args.blur_sigma <= 0 or args.blur_size < 1 or args.blur_size % 2 == 0:
        raise common.UserError("need 0 <= --g-drop < 1, --blur-sigma > 0 and an odd --blur-size")
    args.speeds = pd_stages(args.nfe, args.start_steps, args.schedule) if args.base == "pd" else {}
    args.stages = list(args.speeds) if args.base == "pd" else None
    if args.stages == []:
        raise common.UserError(f"--nfe {args.nfe}: SFERD-PD needs at least one distillation stage (--nfe < --start-steps)")
    args.taus = cd.sampling_taus(args.nfe, args.taus) if args.base == "cd" else None
    return args


# ----------------------------------------------------------------------------------------------
# The teacher: SFERD-PD's stages and speeds n (Table 6), attention guidance (Alg. 1 lines 8-13)
# ----------------------------------------------------------------------------------------------

def pd_stages(nfe, start_steps, schedule="halving"):
    """{student steps: n} of the stages, n the teacher's steps over the student's: halving (start/2, ..., nfe; n = 2 each)
    or two-stage (Table 6's 1024 -> 32 -> 1 and 1024 -> 64 -> 2: M = 2^ceil(log2 sqrt(start*nfe)), one stage when M is
    not strictly in between)."""
    steps = pd.stage_steps(nfe, start_steps)                  # validates: powers of two, nfe <= start
    if schedule == "two-stage" and steps:
        mid = 2 ** math.ceil(math.log2(math.sqrt(start_steps * nfe)) - 1e-9)
        steps = [mid, nfe] if nfe < mid < start_steps else [nfe]
    return {N: T // N for T, N in zip([start_steps, *steps], steps)}


def attention_mask(attn, k, size):
    """psi = 1[A > k] (Eq. 10), A the attention each key receives (B x heads x queries x keys: mean over heads, sum over
    queries, mean 1), reshaped r x r and nearest-upsampled to size = (H, W); B x 1 x H x W."""
    A = attn.float().mean(dim=1).sum(dim=1)
    r = math.isqrt(A.shape[1])
    return F.interpolate((A > k).float().reshape(-1, 1, r, r), size=size, mode="nearest")


def attn_block(net, name=None):
    """--attn-block checked against the teacher's blocks; by default the highest-resolution decoder self-attention block
    (the paper: 32x32 maps correlate best), the last one."""
    dec = [n for n in net.attn_names if n.startswith("dec")]
    if name is None and not dec or name is not None and name not in net.attn_names:
        raise common.UserError(f"--attn-block {name or '(the default)'}: the teacher has no such decoder attention block "
                               f"({', '.join(net.attn_names)})")
    return name or max(reversed(dec), key=lambda n: int(n[3:].split(".")[0]))


def gaussian_kernel(sigma, size):
    """1-D Gaussian, normalised to sum 1 (the blur preserves a constant image)."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma**2))
    return (g / g.sum()).float()


def gaussian_blur(x, sigma=3.0, size=15):
    """B(x) of Alg. 1 line 11: separable depthwise Gaussian convolution (rows, then columns), reflect padding."""
    C, pad, g = x.shape[1], size // 2, gaussian_kernel(sigma, size).to(x.device, x.dtype)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)


def guided(D, args):
    """D~(x, sigma) = x0_teacher of Alg. 1 lines 8-13, EDM view x = z_t/alpha_t, sigma = s_t/alpha_t (--no-guidance: D);
    --guidance-space eps: eps~ = (1 + w)*eps_hat - w*eps_attn and x0 = x - sigma*eps~ (the authors' code)."""
    if args.no_guidance:
        return D
    block = attn_block(D.net, args.attn_block)

    def D_guided(x, sigma, cond=None):
        sigma = common.as_batch(sigma, x)
        x0_hat, extras = D(x, sigma, attn=block)                         # line 8 (A_t^l) and line 9
        eps_hat = (x - x0_hat) / sigma
        psi = attention_mask(extras["attn"], args.k, x.shape[-2:])      # line 10
        x_tilde = gaussian_blur(x0_hat, args.blur_sigma, args.blur_size) + sigma * eps_hat   # line 11 / alpha_t
        x_attn = (1 - psi) * x + psi * x_tilde                          # line 12, Eq. 10
        x0_attn = D(x_attn, sigma)                                      # Eq. 11
        if args.guidance_space == "eps":                                # the authors': guide eps, re-derive x0
            return x - sigma * ((1 + args.w) * eps_hat - args.w * (x_attn - x0_attn) / sigma)
        return (1 + args.w) * x0_hat - args.w * x0_attn                 # line 13
    return common.full_precision(D_guided)                               # a frozen teacher: fp32, blur included


# ----------------------------------------------------------------------------------------------
# The gradient predictor G_tau (Sec. 4.2, App. B.1), Alg. 1, and the phases: the base with the guided teacher,
#   then E_phi and G_tau on Alg. 1, then the latent DDPM over z_sem (Table 4)
# ----------------------------------------------------------------------------------------------

class SemanticEncoder(nn.Module):
    """SFERD's E_phi(x0) -> z_sem: stride-2 convs with GroupNorm + SiLU (the encoder part of a U-Net), pooled, Linear."""

    def __init__(self, in_ch, z_dim, ch=32, mults=(1, 2, 4)):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ch, 3, padding=1)]
        for c, m in zip((1, *mults), mults):
            layers += [nn.Conv2d(c * ch, m * ch, 3, stride=2, padding=1), common.group_norm(m * ch), nn.SiLU()]
        self.body, self.out = nn.Sequential(*layers), nn.Linear(mults[-1] * ch, z_dim)

    def forward(self, x0):
        return self.out(self.body(x0).mean(dim=(2, 3)))


class GradientPredictor(nn.Module):
    """G_tau(x_t, z_sem, t): the student's encoder features and time embedding (passed in) feed a fresh middle + decoder +
    output conv, AdaGN on z_sem, zero at init; x, sigma in the EDM view (the student's scaling), G in VP units (d/dz_t)."""

    def __init__(self, student_net, z_dim):
        super().__init__()
        self.body = common.build_net(student_net.config, cond_dim=z_dim, dropout=0.0)
        self.body.down, self.body.emb, self.body.conv_in = nn.ModuleList(), None, None   # reused from the student

    def forward(self, student_net, x, sigma, z_sem):
        _, _, c_in, c_noise = common.edm_precond(common.as_batch(sigma, x))
        h, skips, emb = student_net.encode(c_in * x, c_noise.flatten())
        return self.body.conv_out(self.body.decode(h, skips, emb, cond=z_sem)).float()


def predictor_loss(G, x0_target, x0_student, alpha_prev, s_prev, weight):
    """Alg. 1 line 18: w(lambda_t)*|(s_{t-1}^2/alpha_{t-1})*G - (x0_target - x0_student)|^2 (per-pixel mean); the scale
    s_{t-1}^2/alpha_{t-1} is from Eq. 14."""
    err = s_prev**2 / alpha_prev * G - (x0_target - x0_student)
    return (weight.flatten() * err.pow(2).mean(dim=(1, 2, 3))).mean()


def alg1_pd(student, teacher, x0, gen, E, G, N, n=2):
    """SFERD-PD's Alg. 1 for a batch x0 (line 3), an N-step student and teacher = guided(...) (lines 8-13): the loss of
    line 18, which trains E_phi and G_tau (and, in the joint phase, the student)."""
    i = torch.randint(N, (len(x0),), generator=gen)                  # lines 4-6: t = (i+1)/N, the student's grid
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = (i.double() + 1) / N
    alpha_t, s_t = pd.alpha_sigma(t, x0)
    z_t = alpha_t * x0 + s_t * eps                                   # line 7
    x0_target, _ = pd.teacher_target(teacher, z_t, t, N, n)          # lines 8-16: n steps of the guided teacher, x~
    x0_student = common.vp_predict(student, z_t, alpha_t, s_t)[0]
    alpha_p, s_p = pd.alpha_sigma(t - 1 / (n * N), x0)               # t-1 = t - 1/(nN), line 15's step: > 0 at t = 1/N
    z_sem = E(x0)                                                    # line 17
    G_t = G(student.net, z_t / alpha_t, s_t / alpha_t, z_sem)
    return predictor_loss(G_t, x0_target, x0_student, alpha_p, s_p, pd.truncated_snr_weight(alpha_t, s_t))   # line 18


def alg1_cd(f, teacher, x0, gen, E, G, sigmas):
    """SFERD-CD's Alg. 1: CD's pair (t, t2) of the Karras grid and its target f(guided teacher's Heun step to t2, t2)
    (cd.cd_pair, stop-gradient) in place of lines 4-16; t-1 = t2, lambda = 1; lines 17-18 as alg1_pd."""
    n = cd.draw_n(len(sigmas), sigmas, len(x0), gen, "uniform").to(x0.device)     # n ~ U{0..N-2}
    z = torch.randn(x0.shape, generator=gen).to(x0.device)
    x_t, t, t2, x0_target = cd.cd_pair(f, teacher, x0, n, z, sigmas)               # x_t = x0 + t*z; the target
    x0_student = f(x_t, t)
    z_sem = E(x0)                                                                  # line 17
    return predictor_loss(G(f.net, x_t, t, z_sem), x0_target, x0_student, *common.vp_from_sigma(t2),
                          torch.ones(len(x0), device=x0.device))                   # line 18


def train_pd(args, pg, data, D, out, settings, gen):
    """SFERD-PD's base phase: PD's outer loop (pd.distil), guided teachers, n-step targets. Returns the student, the
    guided teacher of its stage, Alg. 1 for the predictor phase, and the images and seconds so far."""
    n, schedule = args.speeds, pd.linear_anneal if args.lr_schedule == "anneal" else common.constant_lr
    stages = " -> ".join(map(str, [args.start_steps, *args.stages]))
    pg.log(f"SFERD-PD stages {stages}, n {n}, lr {args.lr:g} {args.lr_schedule}")
    student, teacher, totals = pd.distil(args, pg, data, D, args.stages, out, settings, gen, name="sferd-pd",
                                         loss=lambda s, T, x, g, N: pd.pd_loss(s, T, x, g, N, n=n[N]), schedule=schedule,
                                         guide=lambda s: guided(s, args), speeds=n)        # eta <- theta, guided
    return student, teacher, lambda s, T, x0, g, E, G: alg1_pd(s, T, x0, g, E, G, args.nfe, n[args.nfe]), totals


def train_cd(args, pg, data, D, out, settings, gen):
    """SFERD-CD's base phase: cd.py's Alg. 2 (cd.cd_loss, RAdam, no clipping) with the guided teacher, the target and
    sampling EMAs updated by the loop. Returns as train_pd (the student: the sampling EMA f_ema)."""
    teacher, (f, f_target, f_ema), path = guided(D, args), cd.consistency_nets(D, args.mu), out / "student.pt"
    sigmas = common.karras_sigmas(args.N).float().to(pg.device)
    nets = dict(net=f.net, ema=f_ema.net, **({"target": f_target.net} if f_target is not f else {}))
    settings = dict(settings, **{k: getattr(args, k) for k in ("N", "mu", "ema_rate", "lr", "metric", "batch", "weighting")})
    loss = lambda s, T, x0, g: cd.cd_loss(s, T, x0, g, f_target=f_target, sigmas=sigmas, metric=args.metric,
                                          weighting=args.weighting)
    opt = torch.optim.RAdam(f.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    budget = common.Budget(args.iters, "updates", args.batch, args.lr, args.ckpt_every)
    run = common.train_loop(pg, loss, data, f, teacher, opt, budget, common.Run(
        path, "sferd-cd-student", settings, nets, gen, emas=cd.ema_updates(f, f_target, f_ema, args.mu, args.ema_rate),
        resume=common.resume_from(path, "sferd-cd-student", args.resume), desc="CD"))
    alg1 = lambda s, T, x0, g, E, G: alg1_cd(s, T, x0, g, E, G, sigmas)
    return f_ema.eval(), teacher, alg1, common.add_run(dict(images=0, seconds=0.0), "CD", run)


def train_predictor(args, pg, data, student, teacher, alg1, out, settings, totals):
    """E_phi and G_tau on Alg. 1 (alg1_pd or alg1_cd), the student frozen for the first half, then trained jointly at
    joint_lr (Sec. 4.2); resumable from out/predictor.pt. Returns (E, G, the images and seconds so far)."""
    E = SemanticEncoder(data.shape[1], args.z_dim).to(pg.device)
    G = GradientPredictor(student.net, args.z_dim).to(pg.device)
    opt = torch.optim.Adam([{"params": list(E.parameters()) + list(G.parameters()), "lr": args.pred_lr},
                            {"params": list(student.net.parameters()), "lr": args.joint_lr}])
    path, P = out / "predictor.pt", args.pred_iters
    budget = common.Budget(P, "updates", args.pred_batch, [args.pred_lr, args.joint_lr], args.ckpt_every)
    settings = dict(settings, **{k: getattr(args, k) for k in ("z_dim", "pred_batch", "pred_lr", "joint_lr")})
    run = common.train_loop(pg, lambda s, T, x0, g: alg1(s, T, x0, g, E, G), data, student, teacher, opt, budget, common.Run(
        path, "sferd-predictor", settings, dict(E=E, G=G, student=student.net),
        torch.Generator().manual_seed(args.seed * 1000 + pg.rank + 500),
        resume=common.resume_from(path, "sferd-predictor", args.resume), desc="predictor",
        before_step=lambda step: student.requires_grad_(step >= P // 2)))     # phase 1 frozen, phase 2 joint (Sec. 4.2)
    student.requires_grad_(False).eval()
    return E.eval().requires_grad_(False), G.eval().requires_grad_(False), common.add_run(totals, "predictor", run)


class LatentMLP(nn.Module):
    """eps_omega(z_t, t): an MLP whose every layer also sees z_t (Diff-AE's MLPSkipNet); buffers: the mean and
    std of the vectors it models (its samples are denormalised with them)."""

    def __init__(self, z_dim, hidden, layers):
        super().__init__()
        self.t_emb = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList([nn.Linear((hidden if i else 0) + z_dim, hidden) for i in range(layers)])
        self.out = common.zero_init(nn.Linear(hidden, z_dim))
        self.register_buffer("mean", torch.zeros(z_dim))
        self.register_buffer("std", torch.ones(z_dim))

    def forward(self, z, t):
        emb, h = self.t_emb(common.timestep_embedding(t.float(), 64)), z[:, :0]
        for layer in self.layers:
            h = F.silu(layer(torch.cat([h, z], dim=1)) + emb)
        return self.out(h)


def latent_loss(mlp, z, t, eps, alpha_bar):
    """|eps - eps_omega(sqrt(abar_t)*z + sqrt(1-abar_t)*eps, t)|, L1 (Eq. 16); alpha_bar[t] for t = 0..T-1."""
    abar = alpha_bar.to(z.device)[t][:, None]
    return (eps - mlp(abar.sqrt() * z + (1 - abar).sqrt() * eps, t)).abs().mean()


@torch.no_grad()
def sample_latent(mlp, noise, steps, mean, std, alpha_bar):
    """DDIM (eta 0) over `steps` evenly spaced of the T = len(alpha_bar) steps; returns z * std + mean."""
    abar, z = alpha_bar.to(noise.device), noise
    ts = torch.linspace(len(abar) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        eps = mlp(z, torch.full((len(z),), t, device=z.device))
        z0 = (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        z = a_next.sqrt() * z0 + (1 - a_next).sqrt() * eps
    return z * std + mean


def train_latent(args, pg, data, E, out, settings, totals):
    """The latent DDPM over normalised z_sem = E_phi(x0) of all the data (Eq. 16), sampled through its EMA (Table 4);
    resumable from out/latent.pt, fit again to another E_phi. Returns (the EMA, the totals with its seconds)."""
    path, mlp = out / "latent.pt", LatentMLP(args.z_dim, args.latent_hidden, args.latent_layers).to(pg.device)
    settings = dict(settings, **{k: getattr(args, k) for k in PRESETS["smoke"] if k not in ("latent_steps", "ckpt_every")})
    ck, zn = common.resume_from(path, "sferd-latent", args.resume), None     # a finished one draws no batch
    if ck is not None and ck.get("settings") != settings:
        pg.log(f"{path} was fit to another E_phi or other settings: fitting the latent DDPM again")
        ck = None
    if ck is None or not ck["finished"]:
        with torch.no_grad():
            z = torch.cat([E(common.to_float(data[i:i + 500]).to(pg.device)) for i in range(0, len(data), 500)]).float()
        mlp.mean.copy_(z.mean(0))
        mlp.std.copy_(z.std(0).clamp(min=1e-4))
        zn = (z - mlp.mean) / mlp.std                               # zero mean, unit variance (App. B.1)
    ema = copy.deepcopy(mlp).requires_grad_(False)                  # Table 4: the EMA samples
    loss = lambda m, _, z, g: latent_loss(m, z, torch.randint(len(LATENT_ALPHA_BAR), (len(z),), generator=g).to(
        z.device), torch.randn(z.shape, generator=g).to(z.device), LATENT_ALPHA_BAR)      # Eq. 16
    budget = common.Budget(args.latent_iters, "updates", args.latent_batch, args.latent_lr, args.ckpt_every)
    run = common.train_loop(pg, loss, zn, mlp, None, torch.optim.Adam(mlp.parameters(), lr=args.latent_lr), budget,
                            common.Run(path, "sferd-latent", settings, dict(mlp=mlp, ema=ema),
                                       torch.Generator().manual_seed(args.seed * 1000 + pg.rank + 900),
                                       emas=[(ema, mlp, args.latent_ema)], resume=ck, desc="latent DDPM"))
    return ema.eval(), common.add_run(totals, "latent DDPM", run, images=False)    # its seconds: SFERD's training cost


# ----------------------------------------------------------------------------------------------
# Sampling (Alg. 2), the comparison with the base, and the benchmark (python common.py bench)
# ----------------------------------------------------------------------------------------------

def corrected_x0(x0, G, sigma, sigma_prev, mode="train"):
    """Alg. 2's x0~ = (z_t - s_t*eps~)/alpha_t for a student that predicts x0 (sigma, sigma_prev: EDM view of t and t-1).
    'paper': eps~ = eps - s_t*G, so x0~ = x0 + (s_t^2/alpha_t)*G; 'train': x0 + (s_{t-1}^2/alpha_{t-1})*G, what G learnt."""
    (alpha_t, s_t), (alpha_p, s_p) = common.vp_from_sigma(sigma), common.vp_from_sigma(sigma_prev)
    return x0 + (s_t**2 / alpha_t if mode == "paper" else s_p**2 / alpha_p).to(x0.dtype) * G


def corrected_denoiser(D, G, z_sem, sigma_prevs, mode="train", g_drop=0.0):
    """D~(x, sigma) = x0~ of Alg. 2 for a student D that predicts x0 (PD's denoiser, CD's f): call i is corrected with
    t-1 = sigma_prevs[i] (EDM view), except the last g_drop fraction of calls (--g-drop, authors' code 0.3)."""
    calls, steps = iter(enumerate(sigma_prevs)), round((1 - g_drop) * len(sigma_prevs))

    def D_tilde(x, sigma, cond=None):
        (i, sigma_prev), x0 = next(calls), D(x, sigma)
        if i >= steps:
            return x0
        return corrected_x0(x0, G(D.net, x, sigma, z_sem), common.as_batch(sigma, x), common.as_batch(sigma_prev, x), mode)
    return D_tilde


def sample_sferd_pd(D, eps, N, G, z_sem, mode="train", g_drop=0.0, n=2):
    """pd.sample_ddim with Alg. 2's x0~; step t = k/N has t-1 = (k - 1/n)/N, the teacher's step (alg1_pd)."""
    t_prev = torch.tensor([(k - 1 / n) / N for k in range(N, 0, -1)], dtype=torch.float64)
    sigma_prev = common.sigma_from_vp(*common.cosine_alpha_sigma(t_prev, logsnr_min=pd.LOGSNR_MIN)).tolist()
    return pd.sample_ddim(corrected_denoiser(D, G, z_sem, sigma_prev, mode, g_drop), eps, N)


def sample_sferd_cd(f, eps, taus, G, z_sem, N, mode="train", g_drop=0.0):
    """cd.sample_cd with Alg. 2's x0~; a call at sigma has t-1 = the next lower point of CD's N-point grid (alg1_cd's t2;
    a point within 1% counts as sigma itself, for --taus written with a few decimals)."""
    grid = common.append_zero(common.karras_sigmas(N))
    sigma_prev = [grid[grid < 0.99 * s][0].item() for s in [cd.SIGMA_MAX, *taus]]
    f_tilde = corrected_denoiser(f, G, z_sem, sigma_prev, mode, g_drop)
    return cd.sample_cd(f_tilde, cd.SIGMA_MAX * eps, taus, cd.renoise_source(eps).ahead(len(taus), *eps.shape[1:]))


def make_sampler(args, student, G=None, latent=None):
    """sample_fn for fid.report: unit noise -> images; z_sem from the latent DDPM (Alg. 2, unconditional) with noise
    keyed by each sample's starting noise (cd.renoise_source, another seed)."""
    if G is None:
        return (lambda eps: pd.sample_ddim(student, eps, args.nfe)) if args.base == "pd" else cd.make_sampler(student, args.taus)
    z_sem = lambda eps: sample_latent(latent, cd.renoise_source(eps, common.EVAL_SEED + 1).randn(args.z_dim),
                                             args.latent_steps, latent.mean, latent.std, LATENT_ALPHA_BAR)
    if args.base == "pd":
        n = args.speeds[args.nfe]
        return lambda eps: sample_sferd_pd(student, eps, args.nfe, G, z_sem(eps), args.g_scale, args.g_drop, n)
    return lambda eps: sample_sferd_cd(student, eps, args.taus, G, z_sem(eps), args.N, args.g_scale, args.g_drop)


def base_run_metrics(args):
    """SFERD vs its base at the same settings (the paper's claim): this file's --no-guidance --no-predictor run (exactly
    the base) or the base's own run (pd.py / cd.py), whichever has the same preset, NFE and stages."""
    runs = common.RUNS / common.dataset_slug(args.dataset)
    m = fid.baseline_metrics([runs / f"sferd-{args.base}-noguide-nopred-nfe{args.nfe}" / "metrics.json",
                              runs / f"{args.base}-{args.preset}" / f"nfe{args.nfe}" / "metrics.json"],
                             dict(preset=args.preset, nfe=args.nfe, start_steps=args.start_steps, stages=args.stages))
    return m if m["base_run"] else dict(m, base_note=f"for the base, run this file with --no-guidance --no-predictor "
                                        f"(or `python {args.base}.py` with the same settings)")


# The paper preset's cost, which a paper run on a machine without CUDA is refused with at once: FLOPs of
# one image of SFERD-PD's first stage (the guided teacher's steps, the student), counted on the meta device by
# `python common.py flops`
# (tests/test_distributed.py counts them again), and the units in the preset's budget (bench_step's total).
PAPER_COST = dict(unit="images", units=64_000_000, flops_per_unit=8.337e11)


def bench_step(teacher, preset, device, batch=None):
    """One update of SFERD-PD's base phase in its first stage (n DDIM steps of the guided teacher, two U-Net calls each,
    and the student). Unit: images; budget: its stages down to 1 step (the smaller predictor and latent DDPM not counted)."""
    args = parse_args(["--preset", preset, "--nfe", "1"])
    T, student, N, batch = guided(teacher, args), pd.make_student(teacher), args.stages[0], batch or args.batch
    opt, pg, gen = torch.optim.Adam(student.parameters(), lr=args.lr), common.Dist(str(device)), torch.Generator()

    def step():
        x = torch.rand((batch, *common.image_shape(teacher.net)), device=device) * 2 - 1
        with common.autocast(device):
            out = pd.pd_loss(student, T, x, gen, N, n=args.speeds[N])
        common.optimizer_steps(pg, out, opt, list(student.parameters()), clip=args.grad_clip)

    total = sum(pd.stage_budget(args, N, None).total for N in args.stages) * args.batch
    return dict(step=step, unit="images", per_step=batch, total=total, nets=[teacher.net, student.net])


def main(argv=None):
    args = parse_args(argv)
    pg = common.Dist(args.device, args.compile, args.channels_last)
    eps_space = args.guidance_space == "eps" and not args.no_guidance
    variant = f"sferd-{args.base}" + "-noguide" * args.no_guidance + "-epsguide" * eps_space + "-nopred" * args.no_predictor
    out = common.run_dir(args.out, args.dataset, f"{variant}-nfe{args.nfe}")
    base_files = [pd.stage_path(out, N) for N in args.stages] if args.base == "pd" else [out / "student.pt"]
    common.resume_note(pg, args.resume, *base_files, out / "predictor.pt", out / "latent.pt")
    ev = common.Eval.of(args)
    fid.check_exports(ev, out)
    data, D, teacher_path = common.load_inputs(ev, pg, args.seed, ("fewstep",), "SFERD reads the teacher U-Net's "
                                               "attention maps and splits its encoder from its decoder")
    if not args.no_guidance:
        args.attn_block = attn_block(D.net, args.attn_block)         # a bad --attn-block fails now, not in training
    pg.log(f"{variant}: {args.dataset}, preset {args.preset}, NFE {args.nfe}, attention block {args.attn_block}, "
           f"k {args.k}, w {args.w}, blur sigma {args.blur_sigma}, {pg.world} process(es) on {pg.device}")
    # What the trained networks depend on: saved with every file of the run, a --resume with others is refused.
    settings = dict(teacher_sha256=common.fingerprint(teacher_path), start_steps=args.start_steps,   # guidance: "eps" or a bool
                    guidance="eps" if eps_space else not args.no_guidance,
                    **(dict(schedule=args.schedule, lr_schedule=args.lr_schedule) if args.base == "pd" else {}),
                    **({} if args.no_guidance else
                       {k: getattr(args, k) for k in ("k", "w", "blur_sigma", "blur_size", "attn_block")}))
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)              # as pd.py's and cd.py's
    student, teacher, alg1, totals = (train_pd if args.base == "pd" else train_cd)(args, pg, data, D, out, settings, gen)
    base_images, G, latent = totals["images"], None, None
    if not args.no_predictor:                                        # E_phi, G_tau on Alg. 1, then the latent DDPM
        settings.update(base=args.base, nfe=args.nfe)
        E, G, totals = train_predictor(args, pg, data, student, teacher, alg1, out, settings, totals)
        latent, totals = train_latent(args, pg, data, E, out, settings, totals)
    info = dict(method="sferd", variant=variant, nfe=args.nfe, train_seconds=totals["seconds"], images_seen=totals["images"],
                base=args.base, base_phase_images=base_images, guidance=not args.no_guidance, predictor=not args.no_predictor,
                **{k: getattr(args, k) for k in ("attn_block", "k", "w", "guidance_space", "blur_sigma", "blur_size",
                                                 "g_scale", "g_drop")},
                latent_ddim_steps=args.latent_steps if G is not None else 0, start_steps=args.start_steps, stages=args.stages,
                calls_per_step="student + G_tau (its own encoder pass)" if G is not None else "student",
                schedule=args.schedule, **base_run_metrics(args))
    fid.report(ev, pg, out, D, teacher_path, make_sampler(args, student, G, latent), info, data.shape[1:],
               student=student, curves=totals.get("curves"))
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
