"""sferd.py: SFERD, Spatial Fitting-Error Reduction Distillation (Zhou et al., AAAI 2024), on top of PD or CD:
an attention-guided teacher + a semantic gradient predictor.

Paper: Shengzhe Zhou, Zejian Li, Shengyuan Zhang, Lefan Hou, Changyuan Yang, Guang Yang, Zhiyuan Yang,
Lingyun Sun, "Reducing Spatial Fitting Error in Distillation of Denoising Diffusion Models", AAAI 2024,
arXiv:2311.03830 (Algorithms 1 and 2, Section 4, Appendix B). Authors' partial code: Sainzerjj/SFERD. Spec: ../shared/specs/METHODS.md, 4.

What is implemented:
  - The base distiller, imported: --base pd (pd.run_chain's chain of stages, DDIM) or --base cd (cd.py's
    consistency function, Heun teacher step, training loop). SFERD changes what the teacher is.
  - SFERD-PD's distillation speed n (Alg. 1 lines 4-6, 15-16): one student DDIM step t -> t - 1/N matches n DDIM
    steps of the nN-step teacher (teacher_target; n = 2 is PD's Alg. 2). --schedule two-stage is App. B.1's "number
    of distillation stages 2" with Table 6's best schedules, 1024 -> 32 -> 1 (n = 32, 32) and 1024 -> 64 -> 2
    (n = 16, 32), generalised as start -> M -> nfe with M = 2^ceil(log2 sqrt(start*nfe)); the paper preset uses it
    with a constant Adam lr 2e-4 (App. B.1) and 32M images per stage (Table 6). --schedule halving is PD's (n = 2).
  - Attention guidance in the teacher (Sec. 4.1, Alg. 1 lines 8-13), GuidedTeacher: A = the attention each
    position of one decoder self-attention block receives (mean over heads, summed over queries: mean 1),
    psi = 1[A > k] nearest-upsampled (Eq. 10), a hand-written separable Gaussian blur B, then lines 11-13.
    The base's solver step g uses x0_teacher in place of x0_hat (line 15). In the EDM view x = z/alpha every
    line is the same equation divided by alpha_t, so one wrapper serves both bases.
  - The semantic gradient predictor (Sec. 4.2, App. B.1): E_phi(x0) -> z_sem; G_tau(x_t, z_sem, t) reuses the
    student's encoder features and time embedding, owns a fresh middle + decoder with AdaGN on z_sem and is
    zero-initialised (the student is unchanged at init). Loss: Alg. 1 line 18. The student is frozen for the
    first half of --pred-iters, then trained jointly at a low lr (Sec. 4.2).
  - "t-1" of line 18 is the TEACHER's solver step from t: line 15 is x~_{t-1} = g(x_t, x0_teacher) ("Teacher
    Sampling"); line 16 then targets the student's s. PD: t' = t - 1/(nN) (the student's t - 1/N would make
    the scale vanish on its last step); CD: the next grid point. Sampling uses the same t-1.
  - SFERD-CD's paper preset (App. B.1, Table 3, CIFAR-10): the l2 metric (Sec. 6.2 "We unify the metric function
    to l2"), a 40-step Heun teacher grid (N = 40), RAdam lr 2e-4, batch 256, mu = 0, EMA 0.9999, 32M images.
  - A latent DDPM over normalised z_sem of all the data (App. B.1, Table 4), so unconditional sampling works.
  - Sampling (Alg. 2): eps~ = eps_theta - c_t*G_tau, then the base's step with eps~ (through x0~).
  - Ablations: --no-guidance, --no-predictor, --k, --w, --blur-sigma, --attn-block. With both off the run
    is exactly its base (pd.py / cd.py with the same settings): the paper's comparison at equal budget.

Deviations from the paper, and why:
  - One shared EDM teacher for every method (METHODS.md 0), not the paper's ADM (PD) / NCSN++ (CD) teachers.
  - Sampling scale (--g-scale): Alg. 2's c_t = s_t adds (s_t^2/alpha_t)*G to x0, but line 18 trains G to add
    (s_{t-1}^2/alpha_{t-1})*G; on PD's grid alpha_1 ~ 4.5e-5, so s_t^2/alpha_t ~ 2e4 at the first step: the
    literal form explodes. The default "train" adds what G was trained for; "paper" is Alg. 2 as printed.
  - AdaGN: common.UNet's blocks keep their design ((1+z_s)*GN(h)+z_b, time embedding added after conv1),
    not Eq. 15's z_s*(t_s*GN(h)+t_b)+z_b; z enters as in Eq. 15.
  - SFERD-CD: the target is CD's own (f_theta of the guided teacher's Heun step, stop-gradient); line 18's
    squared error replaces CD's distance.
  - SFERD-PD's time draw: t on the student's grid, t = (i+1)/N, as PD and the authors' code (train_utils.py,
    DistillationTrainer.loss: t = (randint(S) + 1)/S); Alg. 1 lines 4-6 also draw t = s + i, i < n, between the
    student's grid points, times the student never samples at (fewstep's choice).
  - SFERD-PD's loss weight: PD's truncated SNR max(SNR, 1) (pd.truncated_snr_weight); the authors' partial code
    (diffusion/gaussian_diffusion.py, distill_losses_enc) weighs by 1 + SNR (fewstep's choice: PD's own weight).
  - Paper preset, SFERD-PD: the batch is pd.py's 128 (App. B.1 gives none for distillation), so 32M images are
    250k updates per stage; gradient clipping at 1 as in PD (App. B.1 names none for SFERD-PD).
  - Lab and smoke presets: SFERD-PD halves (--schedule halving, n = 2) with PD's linear lr anneal, and SFERD-CD
    uses cd.py's lab settings (pseudo-Huber, N = 18, 600 iterations, iCT's weight): the budgets of the bases, so
    that SFERD compares with pd.py / cd.py at equal cost. At NFE 4 from 16 steps the two schedules coincide
    (16 -> 8 -> 4); at NFE 2 two-stage is 16 -> 8 -> 2, at NFE 1 16 -> 4 -> 1.
  - Lab preset: the bases' lab settings, a 64-d z_sem, a 4 x 256 latent MLP with EMA 0.995 (2000 updates are
    too few for Table 4's 0.9999); the predictor's length and joint lr are our choice (not in the paper).
    SFERD-PD lab starts at 16 steps, not pd.py's 32 (the guided teacher costs two calls per step; two stages,
    as the paper's Table 6 prefers, fit 15 CPU minutes): its same-budget base is --no-guidance --no-predictor.
    Training images are not flipped (pd.py flips them, --xflip, as PD's authors do; fewstep's choice here: the
    comparison that matters is with that base, which sees the same unflipped images).
    Lab guidance is w = 0.1, not 0.3: on the lab teacher (one 8x8 attention block) w = 0.3 made SFERD-PD worse
    than its base (FID-500 79.35 vs 72.05), w = 0.1 did not (71.43); only these two values were tried, judged
    by the same FID-500 the README reports. The paper preset keeps 0.3.
  - --resume: base stages and the predictor phase resume exactly; an unfinished latent DDPM restarts (and one
    fit to another E_phi is fit again). Files record the settings they depend on; other settings are refused.

Run:
  CPU lab:   python sferd.py --dataset fashion --nfe 4 --base pd     (+ --no-guidance --no-predictor: the base)
  CUDA paper: python sferd.py --dataset cifar10 --preset paper --base cd --nfe 1 --device cuda
  torchrun:  torchrun --nproc_per_node=2 sferd.py --preset smoke
  ablation:  python sferd.py --nfe 4 --no-predictor --w 0.5 --blur-sigma 1 --out runs/fashion/sferd-abl
"""
import copy
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cd
import common
import fid
import pd
from common import UserError, as_batch, vp_from_sigma

PRESETS = {
    # w: guidance strength (Eq. 11); the base's settings come from its own file's preset; z_dim: size of z_sem; pred_iters: predictor
    # updates (half frozen, half joint); latent_*: the latent DDPM (Table 4); latent_steps: its DDIM steps.
    "smoke": dict(w=0.3, z_dim=8, pred_iters=4, pred_batch=8, pred_lr=2e-4, joint_lr=2e-5, latent_layers=2,
                  latent_hidden=32, latent_iters=10, latent_batch=16, latent_lr=1e-3, latent_ema=0.5, latent_steps=5,
                  ckpt_every=2),
    "lab": dict(w=0.1, z_dim=64, pred_iters=100, pred_batch=32, pred_lr=2e-4, joint_lr=2e-5, latent_layers=4,
                latent_hidden=256, latent_iters=2000, latent_batch=256, latent_lr=1e-3, latent_ema=0.995,
                latent_steps=50, ckpt_every=50),
    # App. B: Adam 2e-4 (PD) for G_tau/E_phi; Table 4: 10 x 2048 MLP, batch 512, lr 1e-4, EMA 0.9999; 512-d z_sem.
    "paper": dict(w=0.3, z_dim=512, pred_iters=50_000, pred_batch=128, pred_lr=2e-4, joint_lr=2e-5, latent_layers=10,
                  latent_hidden=2048, latent_iters=100_000, latent_batch=512, latent_lr=1e-4, latent_ema=0.9999,
                  latent_steps=100, ckpt_every=5_000),
}
# What SFERD changes in its base's preset (the rest comes from pd.py / cd.py). schedule: "halving" (PD's stages,
# n = 2) or "two-stage" (Table 6: start -> M -> nfe, M = the power of two nearest sqrt(start*nfe) from above,
# 1024 -> 32 -> 1 and 1024 -> 64 -> 2); lr_schedule: "anneal" (PD's linear decay) or "constant" (App. B.1).
BASE_PRESETS = {
    "smoke": dict(pd=dict(schedule="halving", lr_schedule="anneal"), cd={}),
    "lab": dict(pd=dict(start_steps=16, schedule="halving", lr_schedule="anneal"), cd={}),
    # App. B.1: SFERD-PD from 1024 steps in two stages, Adam at a constant 2e-4, 32M images per stage (Table 6) at
    # pd.py's batch 128. SFERD-CD (Table 3, CIFAR-10): l2 metric (Sec. 6.2), 40-step Heun teacher, RAdam 2e-4,
    # batch 256, mu = 0, EMA 0.9999, 32M images = 125k iterations; lambda = 1 as in the CD paper.
    "paper": dict(pd=dict(start_steps=1024, schedule="two-stage", lr_schedule="constant", lr=2e-4, iters=250_000,
                          later_factor=1.0),
                  cd=dict(metric="l2", N=40, batch=256, lr=2e-4, iterations=125_000, mu=0.0, ema_rate=0.9999,
                          weighting="uniform")),
}
LATENT_T, LATENT_BETA = 1000, 0.008         # Table 4: T = 1000, constant beta


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4,
                             nfe_help="student steps (PD: power of two below --start-steps; CD: 1-4 or 1 + len(--taus))")
    p.add_argument("--base", choices=["pd", "cd"], default="pd", help="base distiller: SFERD-PD or SFERD-CD (default pd)")
    p.add_argument("--no-guidance", action="store_true", help="ablation: plain teacher (no attention guidance)")
    p.add_argument("--no-predictor", action="store_true", help="ablation: no E_phi / G_tau / latent DDPM")
    p.add_argument("--k", type=float, default=1.0, help="k, mask threshold psi = 1[A > k] (Eq. 10; paper 1.0)")
    p.add_argument("--w", type=float, default=None, help="w, attention guidance strength (Eq. 11; paper 0.3; "
                   "default: the preset's, lab 0.1)")
    p.add_argument("--blur-sigma", type=float, default=3.0, help="sigma of the Gaussian blur B (paper 3)")
    p.add_argument("--blur-size", type=int, default=15, help="kernel size of B (authors' code 15)")
    p.add_argument("--attn-block", default=None, help="teacher attention block of A (default: the highest-resolution "
                   "decoder block, e.g. dec16.1)")
    p.add_argument("--g-scale", choices=["train", "paper"], default="train",
                   help="sampling scale of G_tau: 'train' = Alg. 1 line 18's s_{t-1}^2/alpha_{t-1}, 'paper' = Alg. 2's s_t")
    p.add_argument("--g-drop", type=float, default=0.0, help="drop G_tau on this last fraction of steps (authors' code 0.3)")
    p.add_argument("--start-steps", type=int, default=None,
                   help="PD: DDIM steps of the original teacher (default: lab 16, paper 1024, smoke pd.py's)")
    p.add_argument("--schedule", choices=["halving", "two-stage"], default=None,
                   help="PD: halving stages (n = 2, PD's) or the paper's two stages with distillation speed n = teacher "
                        "steps / student steps (Alg. 1 lines 4-6, Table 6: 1024 -> 32 -> 1); default: the preset's, "
                        "paper two-stage, lab halving")
    p.add_argument("--iters", type=int, default=None, help="base updates (PD: per stage; CD: total; default: the base's preset, paper: SFERD's 32M images)")
    p.add_argument("--lr", type=common.learning_rate, default=None, help="base learning rate (default: the base's preset; paper: "
                   "App. B.1's 2e-4, constant for SFERD-PD)")
    p.add_argument("--taus", type=float, nargs="+", default=None, help="CD: re-noising sigmas (see cd.py)")
    p.add_argument("--pred-iters", type=int, default=None, help="predictor updates, student frozen for the first half")
    p.add_argument("--latent-iters", type=int, default=None, help="updates of the latent DDPM over z_sem (Table 4: 100k)")
    args = p.parse_args(argv)
    args.hp = dict(PRESETS[args.preset])
    args.w = args.hp["w"] if args.w is None else args.w
    for key in ("pred_iters", "latent_iters"):
        if getattr(args, key) is not None:
            args.hp[key] = getattr(args, key)
    if not 0 <= args.g_drop < 1 or args.blur_sigma <= 0 or args.blur_size < 1 or args.blur_size % 2 == 0:
        raise UserError("need 0 <= --g-drop < 1, --blur-sigma > 0 and an odd --blur-size")
    if args.base == "pd":                    # pd.py's own arguments, filled from its preset and SFERD's changes
        cfg = dict(pd.PRESETS[args.preset], **BASE_PRESETS[args.preset]["pd"])
        args.start_steps = args.start_steps or cfg["start_steps"]
        args.schedule, args.lr_schedule = args.schedule or cfg["schedule"], cfg["lr_schedule"]
        args.iters, args.lr = args.iters or cfg["iters"], args.lr or cfg["lr"]
        args.later_factor, args.later_steps, args.ckpt_every = cfg["later_factor"], cfg["later_steps"], cfg["ckpt_every"]
        args.grad_clip, args.batch = 1.0, args.batch_size or cfg["batch"]
        args.stages = pd_stages(args.nfe, args.start_steps, args.schedule)
        if not args.stages:
            raise UserError(f"--nfe {args.nfe}: SFERD-PD needs at least one distillation stage (--nfe < --start-steps)")
    else:
        cfg = dict(cd.PRESETS[args.preset], **BASE_PRESETS[args.preset]["cd"])
        hp = dict(cfg, batch=args.batch_size or cfg["batch"])
        hp.update({k: v for k, v in (("iterations", args.iters), ("lr", args.lr)) if v is not None})
        hp["taus"] = cd.sampling_taus(args.nfe, args.taus)
        args.cd_hp = hp
    return args


# ----------------------------------------------------------------------------------------------
# SFERD-PD's distillation speed n (Alg. 1 lines 4-6, 15-16; App. B.1, Table 6)
# ----------------------------------------------------------------------------------------------

def pd_stages(nfe, start_steps, schedule="halving"):
    """Student steps of the stages: halving (start/2, start/4, ..., nfe; n = 2 each) or two-stage (Table 6's
    1024 -> 32 -> 1 and 1024 -> 64 -> 2: M = 2^ceil(log2 sqrt(start*nfe)), one stage when M is not in between)."""
    steps = pd.stage_steps(nfe, start_steps)                  # validates: powers of two, nfe <= start
    if schedule == "halving" or not steps:
        return steps
    mid = 2 ** math.ceil(math.log2(math.sqrt(start_steps * nfe)) - 1e-9)
    return [mid, nfe] if nfe < mid < start_steps else [nfe]


def speeds(stages, start_steps):
    """n of each stage: the teacher's steps over the student's, {student steps: n}."""
    return {N: T // N for T, N in zip([start_steps, *stages], stages)}


@torch.no_grad()
def teacher_target(teacher, z_t, t, N, n):
    """Alg. 1 lines 15-16 for PD with distillation speed n: n DDIM steps of the nN-step teacher from t to
    t'' = t - 1/N, then the x~ for which one student DDIM step t -> t'' lands on the teacher's z_t'' (PD's Alg. 2
    for n = 2: pd.teacher_target); where t'' = 0, the teacher's last x_hat. Returns (x~, z_t'')."""
    alpha_t, sigma_t = pd.alpha_sigma(t, z_t)
    z = z_t
    for j in range(n):                                        # line 15, n times: the teacher's DDIM steps
        alpha, sigma = pd.alpha_sigma(t - j / (n * N), z_t)
        alpha_next, sigma_next = pd.alpha_sigma(t - (j + 1) / (n * N), z_t)
        x_hat = common.vp_predict(teacher, z, alpha, sigma)[0]
        z = pd.ddim_step(z, x_hat, alpha, sigma, alpha_next, sigma_next)
    ratio = sigma_next / sigma_t
    x_tilde = (z - ratio * z_t) / (alpha_next - ratio * alpha_t)          # line 16: the x0 target at s = t - 1/N
    last = (t - 1 / N <= 0).reshape(-1, 1, 1, 1).to(z_t.device)
    return torch.where(last, x_hat, x_tilde), z


def lr_factor(args):
    """The stage's lr schedule: PD's linear anneal to 0, or App. B.1's constant lr for SFERD-PD."""
    return pd.linear_anneal if args.lr_schedule == "anneal" else lambda k, iters: 1.0


def pd_loss(student, teacher, x, eps, i, N, n=2):
    """pd.pd_loss with the n-step target: w(lambda_t)*|x~ - x_hat_theta(z_t)|^2, t = (i+1)/N on the student's grid."""
    t = (i.double() + 1) / N
    alpha_t, sigma_t = pd.alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    x_tilde, _ = teacher_target(teacher, z_t, t, N, n)
    x_hat = common.vp_predict(student, z_t, alpha_t, sigma_t)[0]
    return (pd.truncated_snr_weight(alpha_t, sigma_t).flatten() * ((x_hat - x_tilde) ** 2).mean(dim=(1, 2, 3))).mean()


# ----------------------------------------------------------------------------------------------
# Attention guidance in the teacher (Sec. 4.1, Alg. 1 lines 8-13)
# ----------------------------------------------------------------------------------------------

def gaussian_kernel(sigma, size):
    """1-D Gaussian, normalised to sum 1 (the blur preserves a constant image)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return (g / g.sum()).float()


def gaussian_blur(x, sigma=3.0, size=15):
    """B(x): separable depthwise Gaussian convolution (rows, then columns), reflect padding."""
    C, pad = x.shape[1], size // 2
    g = gaussian_kernel(sigma, size).to(x.device, x.dtype)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)


def attention_received(attn):
    """A from B x heads x queries x keys probabilities: mean over heads, sum over queries -> B x keys (mean 1)."""
    return attn.float().mean(dim=1).sum(dim=1)


def attention_mask(attn, k, size):
    """psi = 1[A > k] (Eq. 10), reshaped r x r and nearest-upsampled to size = (H, W); B x 1 x H x W."""
    A = attention_received(attn)
    r = math.isqrt(A.shape[1])
    psi = (A > k).float().reshape(-1, 1, r, r)
    return F.interpolate(psi, size=size, mode="nearest")


def default_attn_block(net):
    """The highest-resolution decoder self-attention block (the paper: 32x32 maps correlate best); the last one."""
    dec = [n for n in net.attn_names if n.startswith("dec")]
    if not dec:
        raise UserError(f"the teacher U-Net has no decoder attention block ({', '.join(net.attn_names)})")
    best = max(int(n[3:].split(".")[0]) for n in dec)
    return [n for n in dec if int(n[3:].split(".")[0]) == best][-1]


class GuidedTeacher(nn.Module):
    """D~(x, sigma) = x0_teacher of Alg. 1 lines 8-13, in the EDM view x = z_t/alpha_t, sigma = s_t/alpha_t."""

    def __init__(self, D, block=None, k=1.0, w=0.3, blur_sigma=3.0, blur_size=15):
        super().__init__()
        self.D, self.k, self.w, self.blur_sigma, self.blur_size = D, k, w, blur_sigma, blur_size
        self.block = block or default_attn_block(D.net)

    @property
    def net(self):                                          # the base files build students from teacher.net
        return self.D.net

    def forward(self, x, sigma, cond=None):
        sigma = as_batch(sigma, x)
        x0_hat, extras = self.D(x, sigma, attn=self.block)              # line 8 (A_t^l) and line 9
        eps_hat = (x - x0_hat) / sigma
        psi = attention_mask(extras["attn"], self.k, x.shape[-2:])     # line 10
        x_tilde = gaussian_blur(x0_hat, self.blur_sigma, self.blur_size) + sigma * eps_hat   # line 11 / alpha_t
        x_attn = (1 - psi) * x + psi * x_tilde                          # line 12, Eq. 10
        x0_attn = self.D(x_attn, sigma)                                 # Eq. 11
        return (1 + self.w) * x0_hat - self.w * x0_attn                 # line 13


def guided(D, args):
    return D if args.no_guidance else GuidedTeacher(D, args.attn_block, args.k, args.w, args.blur_sigma, args.blur_size)


# ----------------------------------------------------------------------------------------------
# The semantic gradient predictor in the student (Sec. 4.2, App. B.1)
# ----------------------------------------------------------------------------------------------

class SemanticEncoder(nn.Module):
    """E_phi(x0) -> z_sem: stride-2 convs with GroupNorm + SiLU (the encoder part of a U-Net), pooled, Linear."""

    def __init__(self, in_ch, z_dim, ch=32, mults=(1, 2, 4)):
        super().__init__()
        layers, c = [nn.Conv2d(in_ch, ch, 3, padding=1)], ch
        for m in mults:
            layers += [nn.Conv2d(c, m * ch, 3, stride=2, padding=1), common.group_norm(m * ch), nn.SiLU()]
            c = m * ch
        self.body, self.out = nn.Sequential(*layers), nn.Linear(c, z_dim)

    def forward(self, x0):
        return self.out(self.body(x0).mean(dim=(2, 3)))


class GradientPredictor(nn.Module):
    """G_tau(x_t, z_sem, t): the student's encoder features and time embedding (passed in, not owned) feed
    a fresh middle + decoder + output conv with AdaGN on z_sem; conv_out and the z maps start at zero."""

    def __init__(self, student_net, z_dim):
        super().__init__()
        self.body = common.build_net(student_net.config, cond_dim=z_dim, dropout=0.0)
        self.body.down, self.body.emb, self.body.conv_in = nn.ModuleList(), None, None   # reused from the student

    def forward(self, student_net, x, sigma, z_sem):
        """x, sigma in the EDM view (the student's own input scaling); returns G in VP units (d/dz_t)."""
        sigma = as_batch(sigma, x)
        _, _, c_in, c_noise = common.edm_precond(sigma)
        h, skips, emb = student_net.encode(c_in * x, c_noise.flatten())
        return self.body.conv_out(self.body.decode(h, skips, emb, cond=z_sem)).float()


def g_scale(alpha_prev, s_prev):
    """s_{t-1}^2 / alpha_{t-1}: the scale of G_tau in the loss of Alg. 1 line 18 (from Eq. 14)."""
    return s_prev**2 / alpha_prev


def predictor_loss(G, x0_target, x0_student, alpha_prev, s_prev, weight):
    """Alg. 1 line 18: w(lambda_t)*|(s_{t-1}^2/alpha_{t-1})*G - (x0_target - x0_student)|^2 (per-pixel mean)."""
    err = g_scale(alpha_prev, s_prev) * G - (x0_target - x0_student)
    return (weight.flatten() * err.pow(2).mean(dim=(1, 2, 3))).mean()


def corrected_x0(x0, G, sigma, sigma_prev, mode="train"):
    """Alg. 2's x0~ = (z_t - s_t*eps~)/alpha_t for a student that predicts x0 (sigma, sigma_prev: EDM view of
    t and t-1). 'paper': eps~ = eps - s_t*G, so x0~ = x0 + (s_t^2/alpha_t)*G; 'train': x0~ = x0 +
    (s_{t-1}^2/alpha_{t-1})*G, the correction G was trained for (see Deviations)."""
    (alpha_t, s_t), (alpha_p, s_p) = vp_from_sigma(sigma), vp_from_sigma(sigma_prev)
    return x0 + (s_t**2 / alpha_t if mode == "paper" else g_scale(alpha_p, s_p)).to(x0.dtype) * G


# ----------------------------------------------------------------------------------------------
# The latent DDPM over normalised z_sem (App. B.1, Table 4, Eq. 16)
# ----------------------------------------------------------------------------------------------

class LatentMLP(nn.Module):
    """eps_omega(z_t, t): an MLP whose every layer also sees the input z_t (skip inputs, as Diff-AE's MLPSkipNet)."""

    def __init__(self, z_dim, hidden, layers):
        super().__init__()
        self.t_emb = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList([nn.Linear((hidden if i else 0) + z_dim, hidden) for i in range(layers)])
        self.out = common.zero_init(nn.Linear(hidden, z_dim))

    def forward(self, z, t):
        emb, h = self.t_emb(common.timestep_embedding(t.float(), 64)), z[:, :0]
        for layer in self.layers:
            h = F.silu(layer(torch.cat([h, z], dim=1)) + emb)
        return self.out(h)


def latent_alpha_bar(device="cpu"):
    return torch.cumprod(torch.full((LATENT_T,), 1 - LATENT_BETA, dtype=torch.float64), 0).float().to(device)


def latent_loss(mlp, z, t, eps):
    """Eq. 16: |eps - eps_omega(sqrt(abar_t)*z + sqrt(1-abar_t)*eps, t)|, L1."""
    abar = latent_alpha_bar(z.device)[t][:, None]
    return (eps - mlp(abar.sqrt() * z + (1 - abar).sqrt() * eps, t)).abs().mean()


@torch.no_grad()
def sample_latent(mlp, noise, steps, mean, std):
    """DDIM (eta 0) over `steps` evenly spaced of the T = 1000 steps; returns denormalised z_sem."""
    abar, z = latent_alpha_bar(noise.device), noise
    ts = torch.linspace(LATENT_T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        eps = mlp(z, torch.full((len(z),), t, device=z.device))
        z0 = (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        z = a_next.sqrt() * z0 + (1 - a_next).sqrt() * eps
    return z * std + mean


# ----------------------------------------------------------------------------------------------
# Training: the base with the guided teacher, then the predictor (two phases), then the latent DDPM
# ----------------------------------------------------------------------------------------------

def pd_terms(student, teacher, x0, gen, N, n=2):
    """SFERD-PD terms of Alg. 1 lines 3-16 for a batch: t = (i+1)/N; t-1 = t' = t - 1/(nN), the teacher's step
    (line 15), so that the scale of line 18 stays non-zero on the student's last step (t - 1/N = 0)."""
    i = torch.randint(N, (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = (i.double() + 1) / N
    alpha_t, s_t = pd.alpha_sigma(t, x0)
    z_t = alpha_t * x0 + s_t * eps                                   # line 7
    x0_target, _ = teacher_target(teacher, z_t, t, N, n)             # lines 8-16 (teacher = GuidedTeacher)
    x0_student = common.vp_predict(student, z_t, alpha_t, s_t)[0]
    alpha_p, s_p = pd.alpha_sigma(t - 1 / (n * N), x0)
    return z_t / alpha_t, s_t / alpha_t, x0_target, x0_student, alpha_p, s_p, pd.truncated_snr_weight(alpha_t, s_t)


def cd_terms(f, teacher, x0, gen, sigmas):
    """SFERD-CD terms: CD's pair (t, t2) of the Karras grid and its target (cd.cd_pair, mu = 0); t-1 is t2,
    the teacher's Heun step; weight lambda = 1."""
    n = cd.draw_n(len(sigmas), sigmas, len(x0), gen, "uniform").to(x0.device)
    z = torch.randn(x0.shape, generator=gen).to(x0.device)
    x_t, t, t2, target = cd.cd_pair(f, teacher, x0, n, z, sigmas)
    return x_t, t, target, f(x_t, t), *vp_from_sigma(t2), torch.ones(len(x0), device=x0.device)


def train_predictor(args, pg, data, student, terms, out, state, chain):
    """E_phi and G_tau with the loss of Alg. 1 line 18; the student frozen for the first half, then joint at
    the preset's joint_lr (Sec. 4.2). Resumable from out/predictor.pt (written with chain). Returns (E, G)."""
    hp, dev = args.hp, pg.device
    chain = dict(chain, **{key: hp[key] for key in ("z_dim", "pred_batch", "pred_lr", "joint_lr")})
    E = SemanticEncoder(data.shape[1], hp["z_dim"]).to(dev)
    G = GradientPredictor(student.net, hp["z_dim"]).to(dev)
    opt = torch.optim.Adam([{"params": list(E.parameters()) + list(G.parameters()), "lr": hp["pred_lr"]},
                            {"params": list(student.net.parameters()), "lr": hp["joint_lr"]}])
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank + 500)
    it, path, P = 0, out / "predictor.pt", hp["pred_iters"]
    if args.resume and path.exists():
        ck = common.load_checkpoint(path, "sferd-predictor")
        pd.check_chain(ck, path, chain)
        for module, key in ((E, "E"), (G, "G"), (student.net, "student")):
            common.load_state(module, ck[key], path)
        opt.load_state_dict(ck["opt"])
        it, state["images"], state["seconds"] = ck["iter"], ck["images"], ck["seconds"]
        pg.restore_state(gen, ck["rng"])
        pg.log(f"resuming the predictor at update {it:,} of {P:,}")
    for module in (E, G, student):
        pg.broadcast(module)
    params = list(E.parameters()) + list(G.parameters()) + list(student.net.parameters())
    local, t0 = pg.batch(hp["pred_batch"]), time.time() - state["seconds"]
    bar = tqdm(total=P, initial=it, unit="it", disable=not pg.main, desc="predictor")
    while it < P:
        student.requires_grad_(it >= P // 2)                        # phase 1 frozen, phase 2 joint (Sec. 4.2)
        x0 = common.to_float(common.random_batch(data, local, gen)).to(dev)
        with common.autocast(dev):
            x_t, sigma, x0_target, x0_student, alpha_p, s_p, weight = terms(student, x0, gen)
            z_sem = E(x0)                                           # line 17
            loss = predictor_loss(G(student.net, x_t, sigma, z_sem), x0_target, x0_student, alpha_p, s_p, weight)
        common.check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pg.sync_grads(params)
        opt.step()
        it += 1
        state["images"] += hp["pred_batch"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", phase="joint" if it > P // 2 else "frozen")
        if it % hp["ckpt_every"] == 0 or it == P:
            rng = pg.gather_state(gen.get_state())
            if pg.main:
                common.save_checkpoint(path, "sferd-predictor", E=E.state_dict(), G=G.state_dict(), opt=opt.state_dict(),
                                       student=student.net.state_dict(), iter=it, rng=rng, images=state["images"],
                                       seconds=time.time() - t0, net_config=student.net.config, **chain)
    bar.close()
    state["seconds"] = time.time() - t0
    student.requires_grad_(False).eval()
    pg.check_in_sync(G)
    return E.eval().requires_grad_(False), G.eval().requires_grad_(False)


def train_latent(args, pg, data, E, out, state, chain):
    """The latent DDPM p_omega(z_{t-1}|z_t) over normalised z_sem = E_phi(x0) of all the data (Eq. 16), sampled
    through its EMA (Table 4); its time counts in state["seconds"]. A finished one fit to this E_phi is reused."""
    hp, dev, path, t0 = args.hp, pg.device, out / "latent.pt", time.time()
    chain = dict(chain, **{key: v for key, v in hp.items() if key not in ("latent_steps", "ckpt_every")})
    mlp = LatentMLP(hp["z_dim"], hp["latent_hidden"], hp["latent_layers"]).to(dev)
    ck = common.load_checkpoint(path, "sferd-latent") if args.resume and path.exists() else None
    if ck is not None and all(ck.get(key) == value for key, value in chain.items()):
        common.load_state(mlp, ck["mlp"], path)
        state["seconds"] += ck["seconds"]
        pg.log(f"reusing the latent DDPM {path}")
        return mlp.eval().requires_grad_(False), ck["mean"].to(dev), ck["std"].to(dev)
    if ck is not None:
        pg.log(f"{path} was fit to another E_phi or other settings: fitting the latent DDPM again")
    with torch.no_grad():
        z = torch.cat([E(common.to_float(data[i:i + 500]).to(dev)) for i in range(0, len(data), 500)]).float()
    mean, std = z.mean(0), z.std(0).clamp(min=1e-4)
    zn = (z - mean) / std                                           # zero mean, unit variance (App. B.1)
    pg.broadcast(mlp)
    ema = copy.deepcopy(mlp).requires_grad_(False)                  # Table 4: the EMA samples
    opt = torch.optim.Adam(mlp.parameters(), lr=hp["latent_lr"])
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank + 900)
    local = pg.batch(hp["latent_batch"])
    for _ in tqdm(range(hp["latent_iters"]), unit="it", disable=not pg.main, desc="latent DDPM"):
        idx = torch.randint(len(zn), (local,), generator=gen)
        t = torch.randint(LATENT_T, (local,), generator=gen).to(dev)
        loss = latent_loss(mlp, zn[idx.to(dev)], t, torch.randn(local, zn.shape[1], generator=gen).to(dev))
        common.check_finite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pg.sync_grads(mlp.parameters())
        opt.step()
        common.ema_update(ema, mlp, hp["latent_ema"])
    seconds = time.time() - t0
    state["seconds"] += seconds                                     # part of SFERD's training cost
    if pg.main:
        common.save_checkpoint(path, "sferd-latent", mlp=ema.state_dict(), mean=mean.cpu(), std=std.cpu(),
                               seconds=seconds, **chain)
    return ema.eval(), mean, std


# ----------------------------------------------------------------------------------------------
# Sampling (Alg. 2)
# ----------------------------------------------------------------------------------------------

def corrected_denoiser(D, G, z_sem, sigma_prevs, mode="train", g_drop=0.0):
    """D~(x, sigma) = x0~ of Alg. 2 for a student D that predicts x0 (PD's denoiser, CD's f): call i is corrected
    with t-1 = sigma_prevs[i] (EDM view), except the last g_drop fraction of calls (--g-drop, authors' code 0.3)."""
    calls, steps = iter(enumerate(sigma_prevs)), round((1 - g_drop) * len(sigma_prevs))

    def D_tilde(x, sigma, cond=None):
        (i, sigma_prev), x0 = next(calls), D(x, sigma)
        if i >= steps:
            return x0
        return corrected_x0(x0, G(D.net, x, sigma, z_sem), as_batch(sigma, x), as_batch(sigma_prev, x), mode)
    return D_tilde


def sample_sferd_pd(D, eps, N, G, z_sem, mode="train", g_drop=0.0, n=2):
    """pd.sample_ddim with Alg. 2's x0~; step t = k/N has t-1 = (k - 1/n)/N, the teacher's step (pd_terms)."""
    t_prev = torch.tensor([(k - 1 / n) / N for k in range(N, 0, -1)], dtype=torch.float64)
    sigma_prev = common.sigma_from_vp(*common.cosine_alpha_sigma(t_prev, logsnr_min=pd.LOGSNR_MIN)).tolist()
    return pd.sample_ddim(corrected_denoiser(D, G, z_sem, sigma_prev, mode, g_drop), eps, N)


def sample_sferd_cd(f, eps, taus, G, z_sem, N, mode="train", g_drop=0.0):
    """cd.sample_cd with Alg. 2's x0~; a call at sigma has t-1 = the next lower point of CD's N-point grid
    (cd_terms' t2; a point within 1% is sigma itself: the default taus are rounded grid points)."""
    grid = common.append_zero(common.karras_sigmas(N, cd.SIGMA_MIN, cd.SIGMA_MAX, cd.RHO))
    sigma_prev = [grid[grid < 0.99 * s][0].item() for s in [cd.SIGMA_MAX, *taus]]
    f_tilde = corrected_denoiser(f, G, z_sem, sigma_prev, mode, g_drop)
    return cd.sample_cd(f_tilde, cd.SIGMA_MAX * eps, taus, cd.renoise_source(eps).randn_like)


def make_sampler(args, student, G=None, latent=None):
    """sample_fn for fid.report: unit noise -> images; z_sem drawn from the latent DDPM (Alg. 2, unconditional)
    with noise keyed by each sample's starting noise (cd.renoise_source, another seed)."""
    if G is None and args.base == "pd":
        return lambda eps: pd.sample_ddim(student, eps, args.nfe)
    if G is None:
        return cd.make_sampler(student, args.cd_hp["taus"])
    mlp, mean, std = latent
    z_sem = lambda eps: sample_latent(mlp, cd.renoise_source(eps, common.EVAL_SEED + 1).randn(args.hp["z_dim"]),
                                      args.hp["latent_steps"], mean, std)
    if args.base == "pd":
        n = speeds(args.stages, args.start_steps)[args.nfe]
        return lambda eps: sample_sferd_pd(student, eps, args.nfe, G, z_sem(eps), args.g_scale, args.g_drop, n)
    return lambda eps: sample_sferd_cd(student, eps, args.cd_hp["taus"], G, z_sem(eps), args.cd_hp["N"], args.g_scale,
                                       args.g_drop)


def base_run_metrics(args):
    """SFERD vs its base at the same settings (the paper's claim): this file's --no-guidance --no-predictor
    run (exactly the base) or the base's own run (pd.py / cd.py), whichever has the same preset, NFE and stages."""
    runs = common.RUNS / common.dataset_slug(args.dataset)
    for path in (runs / f"sferd-{args.base}-noguide-nopred-nfe{args.nfe}" / "metrics.json",
                 runs / f"{args.base}-{args.preset}" / f"nfe{args.nfe}" / "metrics.json"):
        m = json.loads(path.read_text()) if path.exists() else {}
        if [m.get(k) for k in ("preset", "nfe", "start_steps", "stages")] == [args.preset, args.nfe,
                                                                             getattr(args, "start_steps", None),
                                                                             getattr(args, "stages", None)]:
            keys = ("fid", "fid_n", "teacher_rms", "images_seen", "train_seconds")
            return {"base_run": str(path), **{f"base_{k}": m.get(k) for k in keys}}
    return {"base_run": None, "base_note": f"for the base, run this file with --no-guidance --no-predictor (or "
            f"`python {args.base}.py` with the same settings)"}


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

def bench_step(teacher, preset, device, batch=None):
    """One update of SFERD-PD's base phase: PD with the attention-guided teacher (two teacher U-Net calls
    per teacher step, Alg. 1 lines 8-13). Unit: images; budget: its PD chain from 1024 steps (paper) to 1;
    the predictor and latent-DDPM phases (smaller networks) are not counted."""
    cfg = pd.PRESETS[preset]
    batch = batch or cfg["batch"]
    T = GuidedTeacher(teacher, w=PRESETS[preset]["w"])
    student = pd.make_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    stages = pd.stage_steps(1, {"paper": 1024}.get(preset, cfg["start_steps"]))
    updates = sum(round(cfg["iters"] * (cfg["later_factor"] if N <= cfg["later_steps"] else 1)) for N in stages)
    shape, N = common.image_shape(student.net), stages[0]

    def step():
        x = torch.rand((batch, *shape), device=device) * 2 - 1
        eps, i = torch.randn((batch, *shape), device=device), torch.randint(N, (batch,))
        with common.autocast(device):
            loss = pd.pd_loss(student, T, x, eps, i, N)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    return dict(step=step, unit="images", per_step=batch, total=updates * cfg["batch"], nets=[teacher.net, student.net])


def main(argv=None):
    args = parse_args(argv)
    pg = common.Dist(args.device)
    variant = f"sferd-{args.base}" + "-noguide" * args.no_guidance + "-nopred" * args.no_predictor
    out = common.run_dir(args, f"{variant}-nfe{args.nfe}")
    common.check_exports(args, out)
    common.seed_all(args.seed)
    data, _ = common.load_dataset(args.dataset, args.data_dir)
    D, teacher_path = common.load_teacher(args, pg)
    common.require_arch(D.net, ("fewstep",), "SFERD reads the teacher U-Net's attention maps and splits "
                        "its encoder from its decoder")
    common.check_data_shape(data, D, args.dataset)
    teacher_path = teacher_path.resolve()
    if not args.no_guidance:                                         # fail early on a bad --attn-block
        args.attn_block = args.attn_block or default_attn_block(D.net)
        if args.attn_block not in D.net.attn_names:
            raise UserError(f"--attn-block {args.attn_block}: the teacher has {', '.join(D.net.attn_names)}")
    pg.log(f"{variant}: {args.dataset}, preset {args.preset}, NFE {args.nfe}, attention block {args.attn_block}, "
           f"k {args.k}, w {args.w}, blur sigma {args.blur_sigma}, {pg.world} process(es) on {pg.device}")
    # What the trained networks depend on: saved with every file of the run, a --resume with others is refused.
    chain = dict(teacher_sha256=common.fingerprint(teacher_path), start_steps=getattr(args, "start_steps", None), guidance=not args.no_guidance)
    if args.base == "pd":
        chain.update(schedule=args.schedule, lr_schedule=args.lr_schedule)
    if not args.no_guidance:
        chain.update({key: getattr(args, key) for key in ("k", "w", "blur_sigma", "blur_size", "attn_block")})
    if args.base == "pd":
        gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)          # as pd.main
        n = speeds(args.stages, args.start_steps)                     # Alg. 1's n of each stage
        pg.log(f"SFERD-PD stages {' -> '.join(map(str, [args.start_steps, *args.stages]))} (n = "
               f"{', '.join(str(n[N]) for N in args.stages)}), lr {args.lr:g} {args.lr_schedule}")
        student, last_teacher, state = pd.run_chain(args, pg, data, D, args.stages, out, chain, gen,
                                                    wrap=lambda T: guided(T, args), lr_factor=lr_factor(args), speed=n.get,
                                                    loss_fn=lambda s, T, x, eps, i, N: pd_loss(s, T, x, eps, i, N, n[N]))
        teacher = guided(last_teacher, args)
        terms = lambda s, x0, gen: pd_terms(s, teacher, x0, gen, args.nfe, n[args.nfe])
    else:
        args.cd_hp.update(chain)                                      # saved in student.pt with CD's own settings
        if args.resume and (out / "student.pt").exists():
            pd.check_chain(common.load_checkpoint(out / "student.pt", "cd-student")["hp"], out / "student.pt", chain)
        teacher = guided(D, args)
        student, seconds, images = cd.train(args, args.cd_hp, pg, teacher, data, out)
        state = dict(images=images, seconds=seconds)
        sigmas = common.karras_sigmas(args.cd_hp["N"], cd.SIGMA_MIN, cd.SIGMA_MAX, cd.RHO).float().to(pg.device)
        terms = lambda s, x0, gen: cd_terms(s, teacher, x0, gen, sigmas)
    base_images, G, latent = state["images"], None, None
    if not args.no_predictor:
        chain.update(base=args.base, nfe=args.nfe)
        E, G = train_predictor(args, pg, data, student, terms, out, state, chain)
        latent = train_latent(args, pg, data, E, out, state, chain)
    info = dict(method="sferd", variant=variant, nfe=args.nfe, train_seconds=state["seconds"],
                images_seen=state["images"], base=args.base, base_phase_images=base_images, guidance=not args.no_guidance,
                predictor=not args.no_predictor, attn_block=args.attn_block, k=args.k, w=args.w,
                blur_sigma=args.blur_sigma, blur_size=args.blur_size, g_scale=args.g_scale, g_drop=args.g_drop,
                calls_per_step="student + G_tau (its own encoder pass)" if G is not None else "student",
                latent_ddim_steps=args.hp["latent_steps"] if G is not None else 0,
                start_steps=getattr(args, "start_steps", None), stages=getattr(args, "stages", None),
                schedule=getattr(args, "schedule", None), **base_run_metrics(args))
    fid.report(args, pg, out, D, teacher_path, make_sampler(args, student, G, latent), info, data.shape[1:])
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
