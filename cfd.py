"""cfd.py: Classifier-based Feature Distillation, CFD and its regularised form RCFD (Sun et al., "Accelerating Diffusion
Sampling with Classifier-based Feature Distillation", ICME 2023, arXiv:2211.12039): PD with a frozen classifier's feature KL.

  python cfd.py --dataset fashion --nfe 4                          # CPU lab: PD 32->16->8, RCFD 8->4
  python cfd.py --dataset fashion --nfe 4 --pd-baseline            # + plain PD 8->4 at the same budget
  python cfd.py --dataset cifar10 --preset paper --nfe 1           # CUDA: PD 1024->8, RCFD 8->4->2->1
  torchrun --nproc_per_node=2 cfd.py --preset smoke                # two processes (gloo on CPU)

What is implemented (authors' code: zju-SWJ/RCFD; read next to pd.py):
  - PD stages (pd.pd_loss) down to --cfd-from steps, "without the classifier" (Sec. 4.1), in pd.py's folder
    runs/<dataset>/pd-<preset>/ (its stage files are shared) or, at another budget, pd-<preset>-cfd-budget/ or --pd-dir.
  - Then CFD stages (rcfd_loss): PD's z_t and target image x^T = x~ (pd.teacher_target, Eq. 12) and the student's
    x^S = theta(z_t), both through the frozen classifier (gradients reach the student through it); Eq. 7 =
    KL(softmax(F^T/tau) || softmax(F^S)) (Eq. 4, the authors' argument order, batch mean) + beta*(gamma*entropy
    (Eq. 5) + (1 - gamma)*diversity (Eq. 6)) of p = softmax(cls(x^S)), p^ per process under torchrun as the
    authors' Diversity(). --variant cfd: beta = 0. tau, beta, gamma per stage: App. C.4's ResNet-18 values.
  - Adam, lr cosine-annealed over each stage, clip 1, each student a copy of its teacher (App. C.4, RCFD.py);
    images flipped left-right at random (--xflip, RCFD.py's RandomHorizontalFlip), in the PD chain too.
  - The classifier: a ResNet-18-style net trained here on the labels (cached in runs/<dataset>/classifier-<preset>/)
    or --classifier. metrics.json compares with plain PD at the same stage: pd.py's run, or --pd-baseline (the same
    stages, updates and draws with PD's linear lr, into <out>/pd-baseline/nfe<N>/).

Deviations (why):
  - Teacher and schedule are pd.py's (the shared EDM teacher, the cosine log-SNR ending at sigma 80), not the paper's
    iDDPM cosine grid of 1024 steps: PD and CFD then share stage files and compare on one grid.
  - The PD chain anneals its lr linearly (pd.py's), not cosine (App. C.4); its updates, batch and lr are cfd.py's.
  - At t'' = 0 the target x^T is the teacher's last x_hat (pd.teacher_target, PD's rule); the authors apply the x~ formula
    at their table's index 0 (diffusion.py), one step above 0; on pd.py's schedule (sigma(0) = 4.5e-5) it gives x_hat to 1e-4.
  - App. C.4's "20000 for 4 to 1-step" is read as the 4->2 and 2->1 stages (it can also be read as 2->1 only).
  - Classifier: Adam, cosine lr, no augmentation, on rank 0 only (authors': SGD for 300 epochs, AutoAugment, Cutout);
    lab: a narrow 4-stage ResNet for one epoch. It sees images in [-1, 1], as the diffusion model outputs them.
  - Lab: pd.py's lab budget (32 start steps, not 1024), each CFD stage as long as a pd.py lab stage.
"""
import argparse
import json
import math
from pathlib import Path

import common  # first: it sets OpenMP's wait policy, read when torch loads (common.py's top)
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid
import pd

PRESETS = {
    # start_steps, iters, batch, lr, later_*: as pd.py's (for the PD chain and the CFD stages alike); cfd_from: the PD chain
    # stops here and CFD takes over; shared_pd: the budget is pd.py's preset's (its folder is shared); cls_*: classifier.
    "smoke": dict(start_steps=16, cfd_from=8, iters=3, batch=8, lr=1e-4, later_factor=1.0, later_steps=2, ckpt_every=2,
                  shared_pd=True, cls_width=8, cls_blocks=(1, 1), cls_images=256, cls_batch=32, cls_lr=3e-3),
    "lab": dict(start_steps=32, cfd_from=8, iters=300, batch=32, lr=2e-4, later_factor=1.0, later_steps=2, ckpt_every=100,
                shared_pd=True, cls_width=16, cls_blocks=(1, 1, 1, 1), cls_images=60_000, cls_batch=128, cls_lr=3e-3),
    # App. C.3/C.4: base sampler 1024 steps, PD to 8; common setting Adam 5e-5 cosine, batch 128, clip 1,
    # 10k updates (20k "for 4 to 1-step"); ResNet-18 classifier (about 30 epochs of CIFAR-10 here).
    "paper": dict(start_steps=1024, cfd_from=8, iters=10_000, batch=128, lr=5e-5, later_factor=2.0, later_steps=2,
                  ckpt_every=1_000, shared_pd=False, cls_width=64, cls_blocks=(2, 2, 2, 2), cls_images=1_500_000,
                  cls_batch=128, cls_lr=1e-3),
}
BUDGET = ("iters", "batch", "lr", "later_factor", "later_steps")          # pd.py's folder is shared when these are the preset's
# App. C.4, RCFD (ResNet-18): (tau, beta, gamma) by the student's steps of the stage.
STAGE_HPARAMS = {4: (0.95, 0.003, 0.75), 2: (0.95, 0.003, 0.75), 1: (0.85, 0.003, 0.5)}


def parse_args(argv=None):
    p = common.common_parser(common.first_paragraph(__doc__), nfe_default=4, presets=PRESETS, paper_cost=PAPER_COST,
                             nfe_help="N, the final student's DDIM steps (a power of two below --cfd-from)")
    p.add_argument("--variant", default="rcfd", choices=["rcfd", "cfd"], help="rcfd: Eq. 7 (default); cfd: Eq. 4 only (beta = 0)")
    p.add_argument("--tau", type=float, default=None, help="teacher softmax temperature tau of Eq. 4 for every "
                   "CFD stage (default: the paper's per stage, 0.95/0.95/0.85 for 4/2/1 steps)")
    p.add_argument("--beta", type=float, default=None, help="beta of Eq. 7 (default: the paper's 0.003; 0 for --variant cfd)")
    p.add_argument("--gamma", type=float, default=None, help="gamma of Eq. 7 (default: the paper's 0.75, 0.5 at 1 step)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (default: runs/<dataset>/classifier-<preset>/"
                   "classifier.pt, trained on first use)")
    common.preset_flag(p, "cls_images", int, "classifier training length in images (paper ~30 epochs)")
    common.preset_flag(p, "cfd_from", int, "steps of the PD student CFD starts from (paper 8)")
    p.add_argument("--pd-dir", default=None, help="folder of the PD chain (default: pd.py's, runs/<dataset>/pd-<preset>, "
                   "if the budget is pd.py's preset's, else runs/<dataset>/pd-<preset>-cfd-budget)")
    p.add_argument("--pd-baseline", action="store_true", help="also train and evaluate plain PD on the same stages "
                   "with the same updates, batch and lr, linear anneal (into <out>/pd-baseline/nfe<N>/)")
    common.preset_flag(p, "start_steps", int, "DDIM steps of the original teacher (paper 1024)")
    common.preset_flag(p, "iters", int, "updates per stage, PD chain included (paper 10k)")
    common.preset_flag(p, "lr", common.learning_rate, "Adam lr at the start of each stage, cosine-annealed in CFD "
                       "stages, linearly in the PD chain")
    common.preset_flag(p, "later_factor", float, "update multiplier for stages with <= --later-steps student steps")
    common.preset_flag(p, "later_steps", int, "see --later-factor")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (paper 1.0)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=True, help="flip each training image "
                   "left-right with probability 1/2, PD chain included (the authors' RandomHorizontalFlip; default on)")
    common.preset_flag(p, "ckpt_every", int, "updates between checkpoints")
    args = p.parse_args(argv)
    if args.tau is not None and args.tau <= 0:
        raise common.UserError(f"--tau {args.tau}: the temperature must be positive (paper: 0 < tau <= 1)")
    if args.gamma is not None and not 0 <= args.gamma <= 1:
        raise common.UserError(f"--gamma {args.gamma}: must lie in [0, 1] (Eq. 7)")
    if args.beta is not None and args.beta < 0:
        raise common.UserError(f"--beta {args.beta}: must be >= 0 (Eq. 7)")
    return args


def cfd_stages(args):
    """(PD stages down to --cfd-from, CFD stages down to --nfe), as student step counts."""
    if not pd.is_power_of_two(args.cfd_from) or args.cfd_from > args.start_steps:
        raise common.UserError(f"--cfd-from {args.cfd_from}: must be a power of two no larger than --start-steps "
                               f"{args.start_steps}")
    if not pd.is_power_of_two(args.nfe) or args.nfe >= args.cfd_from:
        raise common.UserError(f"--nfe {args.nfe}: CFD halves the {args.cfd_from}-step PD student (--cfd-from), so --nfe "
                               f"must be a power of two below {args.cfd_from} (1, 2, 4, ...)")
    return pd.stage_steps(args.cfd_from, args.start_steps), pd.stage_steps(args.nfe, args.cfd_from)


def stage_hparams(args, N):
    """(tau, beta, gamma) of the stage with an N-step student: the paper's unless given."""
    tau, beta, gamma = STAGE_HPARAMS.get(N, STAGE_HPARAMS[4])
    beta = 0.0 if args.variant == "cfd" else beta
    pick = lambda given, default: default if given is None else given
    return pick(args.tau, tau), pick(args.beta, beta), pick(args.gamma, gamma)


# ----------------------------------------------------------------------------------------------
# The classifier cls = fc(extr(x)) (Sec. 3.2): a ResNet-18-style net, features = pooled last conv map
# ----------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet(nn.Module):
    """ResNet (He et al. 2016) with the CIFAR 3x3 stem; width 64, blocks (2, 2, 2, 2) is ResNet-18."""

    def __init__(self, in_ch=3, classes=10, width=64, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.config = dict(in_ch=in_ch, classes=classes, width=width, blocks=tuple(blocks))
        layers, cin = [nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
        for k, n in enumerate(blocks):
            for j in range(n):
                layers.append(BasicBlock(cin, width * 2**k, 2 if k > 0 and j == 0 else 1))
                cin = width * 2**k
        self.body, self.fc = nn.Sequential(*layers), nn.Linear(cin, classes)

    def extr(self, x):
        """F = extr(x): the globally pooled last features, the input of fc (Eq. 3)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        """(features F, class logits cls(x))."""
        features = self.extr(x)
        return features, self.fc(features)


@torch.no_grad()
def accuracy(cls, images, labels, device, batch=500):
    hits = sum((cls(common.to_float(images[k:k + batch]).to(device))[1].argmax(1).cpu() == labels[k:k + batch]).sum().item()
               for k in range(0, len(images), batch))
    return hits / len(images)


def train_classifier(args, pg, path):
    """Cross-entropy on the dataset's labels (Adam, cosine lr) on every process (the batch split over them, the
    gradients averaged: train_loop); rank 0 saves the net (its BatchNorm statistics) and its test accuracy."""
    images, labels = common.load_dataset(args.dataset, args.data_dir)
    if labels is None:
        raise common.UserError(f"{args.dataset} has no labels to train a classifier on: pass --classifier PATH")
    test_images, test_labels = common.load_dataset(args.dataset, args.data_dir, split="test")
    cls = ResNet(images.shape[1], int(labels.max()) + 1, args.cls_width, args.cls_blocks).to(pg.device)
    opt = torch.optim.Adam(cls.parameters(), lr=args.cls_lr)
    steps = max(1, args.cls_images // args.cls_batch)
    loss = lambda c, _, idx, gen: F.cross_entropy(c(common.to_float(images[idx.cpu()]).to(pg.device))[1],
                                                  labels[idx.cpu()].to(pg.device))
    budget = common.Budget(steps, "updates", args.cls_batch, args.cls_lr, steps, schedule=cosine_anneal)
    gen = torch.Generator().manual_seed(args.seed + 1_000_003 * pg.rank)
    indices = torch.arange(len(images))                      # the data drawn: the indices of the images (and labels)
    common.train_loop(pg, loss, indices, cls, None, opt, budget, common.Run(
        path.parent / "checkpoint.pt", "cfd-classifier-training", {}, dict(net=cls), gen, desc="classifier"))
    acc = accuracy(cls.eval(), test_images, test_labels, pg.device)
    if pg.main:
        common.save_checkpoint(path, "cfd-classifier", config=cls.config, net=cls.state_dict(), test_acc=acc,
                               dataset=args.dataset, images=steps * args.cls_batch)
        (path.parent / "checkpoint.pt").unlink()
    pg.barrier()                                             # the others read rank 0's file next
    pg.log(f"classifier: {sum(p.numel() for p in cls.parameters()) / 1e6:.2f} M params, "
           f"{steps * args.cls_batch:,} images, test accuracy {acc:.4f}; saved {path}")


def load_classifier(args, pg, channels):
    """The frozen classifier: --classifier PATH, else the cached one of dataset and preset, trained
    first (by every process). Returns (classifier, path, test accuracy)."""
    default = common.RUNS / common.dataset_slug(args.dataset) / f"classifier-{args.preset}" / "classifier.pt"
    path = Path(args.classifier or default)
    if not args.classifier and not pg.decide(path.exists):
        train_classifier(args, pg, path)
    ck = common.load_checkpoint(path, "cfd-classifier")
    if ck["config"]["in_ch"] != channels:
        raise common.UserError(f"{path}: a classifier of {ck['config']['in_ch']}-channel images, not {channels}")
    cls = ResNet(**ck["config"])
    common.load_state(cls, ck["net"], path)
    # Frozen (eval-mode BatchNorm, no parameter gradients), but differentiable in its input.
    return cls.to(pg.device).eval().requires_grad_(False), path, ck.get("test_acc")


# ----------------------------------------------------------------------------------------------
# The method: Eq. 4 (feature KL), Eqs. 5-6 (entropy, diversity), Eq. 7 (their sum) on PD's target
# ----------------------------------------------------------------------------------------------

def cfd_loss(F_S, F_T, tau):
    """Eq. 4: KL(softmax(F^T/tau) || softmax(F^S)), the temperature on the teacher only, batch mean."""
    return F.kl_div(F.log_softmax(F_S, dim=1), F.log_softmax(F_T / tau, dim=1), log_target=True, reduction="batchmean")


def entropy_loss(p):
    """Eq. 5: L_entropy = -sum_c p_c log p_c, averaged over the batch (lower: more confident, clearer images)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1).mean()


def diversity_loss(p):
    """Eq. 6: L_diversity = sum_c p^_c log p^_c with p^ = batch mean of p (lowest at balanced classes)."""
    p_bar = p.mean(dim=0)
    return (p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()


def rcfd_loss(student, teacher, x, gen, N, cls, tau, beta, gamma, xflip=False):
    """One batch x of a CFD stage: pd.pd_loss's draws (flips, eps, i), z_t and target x^T = x~, then Eq. 7 on the
    classifier's view of x^T and x^S = theta(z_t) in place of PD's image loss. Returns (loss, parts)."""
    if xflip:
        x = pd.random_xflip(x, gen)                              # RCFD.py's RandomHorizontalFlip
    eps = torch.randn(x.shape, generator=gen).to(x.device)
    i = torch.randint(N, (len(x),), generator=gen)
    t = (i.double() + 1) / N                                     # t = (i+1)/N, i ~ U{0..N-1} (as PD)
    alpha_t, sigma_t = pd.alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    x_T, _ = pd.teacher_target(teacher, z_t, t, N)               # Eq. 12: the teacher's two DDIM steps, PD's x~
    x_S = common.vp_predict(student, z_t, alpha_t, sigma_t)[0]
    with torch.no_grad():
        F_T = cls.extr(x_T).float()                              # Eq. 3 (float: bf16 autocast on CUDA)
    F_S, logits = cls(x_S)
    p = F.softmax(logits.float(), dim=1)                         # Eq. 5: p = softmax(cls(x^S))
    parts = dict(cfd=cfd_loss(F_S.float(), F_T, tau), entropy=entropy_loss(p), diversity=diversity_loss(p))
    return parts["cfd"] + beta * (gamma * parts["entropy"] + (1 - gamma) * parts["diversity"]), parts     # Eq. 7


def cosine_anneal(lr, done, total):
    """App. C.4: the lr times 0.5*(1 + cos(pi*done/total)), from lr to 0 over a stage."""
    return lr * (0.5 * (1 + math.cos(math.pi * done / total)))


# ----------------------------------------------------------------------------------------------
# The chain (pd.distil, pd.py's outer loop): pd.py's stage files, then CFD stages with Eq. 7 in place of the image MSE
# ----------------------------------------------------------------------------------------------

def pd_chain_dir(args):
    """The PD chain's folder: --pd-dir, else pd.py's where the budget is pd.py's preset's (shared_pd, and no flag changed
    it), else runs/<dataset>/pd-<preset>-cfd-budget, so pd.py's paper chain (50k updates per stage) never mixes with
    App. C.4's."""
    if args.pd_dir:
        return Path(args.pd_dir)
    same = args.shared_pd and all(getattr(args, k) == PRESETS[args.preset][k] for k in BUDGET)
    return common.RUNS / common.dataset_slug(args.dataset) / (f"pd-{args.preset}" if same else f"pd-{args.preset}-cfd-budget")


def pd_metrics(folder, args, teacher_sha256):
    """pd.py's metrics.json for the same NFE, chain and teacher (by content), if there is one."""
    path = Path(folder) / f"nfe{args.nfe}" / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    if (m.get("nfe"), m.get("start_steps"), m.get("teacher_sha256"), m.get("xflip", False)) != (
            args.nfe, args.start_steps, teacher_sha256, args.xflip):
        return None
    same = (m.get("iters_per_stage"), m.get("batch"), m.get("lr")) == (args.iters, args.batch, args.lr)
    return {k: m.get(k) for k in ("fid", "fid_n", "teacher_rms", "images_seen", "iters_per_stage", "lr", "batch")} | {
        "source": str(path), "same_budget": same}


# ----------------------------------------------------------------------------------------------
# Benchmark (boilerplate): one training iteration at a preset, random weights (python common.py bench)
# ----------------------------------------------------------------------------------------------

# The paper preset's cost, which a paper run on a machine without CUDA is refused with at once: FLOPs of
# one image of an RCFD stage (PD's teacher calls, the student, the classifier), counted on the meta device by
# `python common.py flops`
# (tests/test_distributed.py counts them again), and the units in the preset's budget (bench_step's total).
PAPER_COST = dict(unit="images", units=15_360_000, flops_per_unit=2.152e11)


def bench_step(teacher, preset, device, batch=None):
    """One update of an RCFD stage (PD's two teacher calls, the student, the classifier on both images).
    Unit: images; budget: the preset's whole chain to 1 step, PD 1024 -> 8 and RCFD 8 -> 1, every update
    priced at RCFD's cost (the PD updates, without the classifier, are cheaper: an upper bound)."""
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    in_ch = common.image_shape(teacher.net)[0]
    cls = ResNet(in_ch, 10, cfg["cls_width"], cfg["cls_blocks"]).to(device).eval().requires_grad_(False)
    student, pg, gen = pd.make_student(teacher), common.Dist(str(device)), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    stages = pd.stage_steps(cfg["cfd_from"], cfg["start_steps"]) + pd.stage_steps(1, cfg["cfd_from"])
    updates = sum(round(cfg["iters"] * (cfg["later_factor"] if N <= cfg["later_steps"] else 1)) for N in stages)
    shape = common.image_shape(student.net)

    def step():
        x = torch.rand((batch, *shape), device=device) * 2 - 1
        with common.autocast(device):
            out = rcfd_loss(student, teacher, x, gen, 4, cls, *STAGE_HPARAMS[4], xflip=True)
        common.optimizer_steps(pg, out, opt, list(student.parameters()), clip=1.0)

    return dict(step=step, unit="images", per_step=batch, total=updates * cfg["batch"],
                nets=[teacher.net, student.net, cls])


def main(argv=None):
    args = parse_args(argv)
    pd_stages, stages = cfd_stages(args)
    pg = common.Dist(args.device, args.compile, args.channels_last)
    out = common.run_dir(args.out, args.dataset, f"{args.variant}-{args.preset}")
    folder = common.hold_folder(common.prepare_out_dir(pd_chain_dir(args)))  # pd.py's chain folder: one writer at a time
    common.resume_note(pg, args.resume, *[pd.stage_path(out, N) for N in stages])
    ev = common.Eval.of(args)
    fid.check_exports(ev, out / f"nfe{args.nfe}")
    data, teacher, teacher_path = common.load_inputs(ev, pg, args.seed)
    cls, cls_path, cls_acc = load_classifier(args, pg, data.shape[1])
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)          # each process its own data/noise
    hparams = {N: stage_hparams(args, N) for N in stages}
    pg.log(f"cfd: {args.dataset}, preset {args.preset}, PD {args.start_steps} -> {args.cfd_from} steps in {folder}, then "
           f"{args.variant} -> {' -> '.join(map(str, stages))} (tau, beta, gamma {hparams}); classifier {cls_path} "
           f"(test acc {cls_acc}); {args.iters:,} updates of {args.batch} per stage, {pg.world} process(es) on {pg.device}")
    settings = dict(start_steps=args.start_steps, teacher_sha256=common.fingerprint(teacher_path), xflip=args.xflip)
    try:                                     # pd.py's stage files (pd.main's settings): reused whatever --resume says
        start, _, totals = pd.distil(args, pg, data, teacher, pd_stages, folder, settings, gen, reuse=True)
    except common.UserError as e:
        raise common.UserError(f"{e} (cfd.py's PD chain, folder {folder}: set by --pd-dir)") from None
    prefix, pd_gen = totals, gen.get_state()                                 # for the --pd-baseline below
    settings = dict(settings, cfd_from=args.cfd_from)                        # the stages below start from it
    cfd_settings = lambda N: dict(settings, variant=args.variant, classifier_sha256=common.fingerprint(cls_path),
                                  **dict(zip(("tau", "beta", "gamma"), hparams[N])))
    rcfd = lambda s, T, x, g, N: rcfd_loss(s, T, x, g, N, cls, *hparams[N], args.xflip)
    # eta <- theta, each CFD stage with its (tau, beta, gamma) (App. C.4) and the cosine lr
    student, _, totals = pd.distil(args, pg, data, start, stages, out, cfd_settings, gen, loss=rcfd, name="cfd",
                                   schedule=cosine_anneal, totals=totals)
    # Plain PD at the same stages and budget: pd.py's own run, or (--pd-baseline) one trained here from
    # the same --cfd-from-step student with the same updates, batch, lr and data/noise draws.
    baseline = pd_metrics(folder, args, settings["teacher_sha256"])
    if args.pd_baseline:
        b_out, b_gen = out / "pd-baseline", torch.Generator()
        b_gen.set_state(pd_gen)
        b, _, b_totals = pd.distil(args, pg, data, start, stages, b_out, settings, b_gen, totals=prefix)
        info = dict(method="pd", variant="pd-baseline", nfe=args.nfe, train_seconds=b_totals["seconds"],
                    images_seen=b_totals["images"], start_steps=args.start_steps, stages=stages, iters_per_stage=args.iters)
        m = fid.report(ev, pg, b_out / f"nfe{args.nfe}", teacher, teacher_path, lambda eps: pd.sample_ddim(b, eps, args.nfe),
                       info, data.shape[1:], student=b, curves=b_totals.get("curves"))
        if pg.main:
            baseline = {k: m[k] for k in ("fid", "fid_n", "teacher_rms", "images_seen")} | {
                "source": str(b_out / f"nfe{args.nfe}" / "metrics.json"), "same_budget": True}
    if baseline:
        pg.log(f"plain PD at {args.nfe} steps ({baseline['source']}): FID {baseline['fid']}, "
               f"teacher_rms {baseline['teacher_rms']:.4f}, {baseline['images_seen']:,} images")
    info = dict(method="cfd", variant=args.variant, nfe=args.nfe, train_seconds=totals["seconds"], images_seen=totals["images"],
                start_steps=args.start_steps, cfd_from=args.cfd_from, pd_dir=str(folder), pd_stages=pd_stages, stages=stages,
                stage_hparams={N: dict(zip(("tau", "beta", "gamma"), h)) for N, h in hparams.items()},
                iters_per_stage=args.iters, lr=args.lr, batch=args.batch, xflip=args.xflip, classifier=str(cls_path),
                classifier_test_acc=cls_acc, pd_baseline=baseline, sampler="DDIM, x_hat clipped to [-1, 1]")
    # The report compares with the original teacher's solvers.
    fid.report(ev, pg, out / f"nfe{args.nfe}", teacher, teacher_path, lambda eps: pd.sample_ddim(student, eps, args.nfe),
               info, data.shape[1:], student=student, curves=totals.get("curves"))
    pg.close()


if __name__ == "__main__":
    common.main_guard(main)
