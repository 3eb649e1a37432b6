"""cfd.py: Classifier-based Feature Distillation (CFD, Sun et al., ICME 2023) and its regularised form
(RCFD), one file: progressive distillation with a frozen classifier's feature KL (+ entropy/diversity for RCFD).

Paper: Wujie Sun, Defang Chen, Can Wang, Deshi Ye, Yan Feng, Chun Chen, "Accelerating Diffusion
Sampling with Classifier-based Feature Distillation", ICME 2023, arXiv:2211.12039.
Authors' code: zju-SWJ/RCFD. Read next to pd.py: CFD is progressive distillation (PD) with the image
loss of Alg. 2 replaced by a loss on a frozen classifier's features; the stage loop is pd.run_chain.

What is implemented (../shared/specs/METHODS.md, section 5):
  - The PD chain of pd.py down to --cfd-from steps (paper: 1024 -> ... -> 8, plain PD "without the
    classifier", Sec. 4.1), run by pd.run_chain in pd.py's folder (runs/<dataset>/pd-<preset>/,
    student-<N>steps.pt), so either script reuses the other's stage files; when cfd.py's budget is
    not pd.py's preset budget (paper: 10k updates, not 50k) the chain gets its own folder,
    runs/<dataset>/pd-<preset>-cfd-budget/, or --pd-dir.
  - From --cfd-from down to --nfe, CFD stages: the 2N-step teacher's two DDIM steps give pd.py's
    target image x^T = x~ (pd.teacher_target, Eq. 12), the student's x^S = theta(z_t); both go, in
    [-1, 1] as they are, through the frozen classifier's extractor (Eq. 3):
        L_CFD = KL(softmax(F^T/tau) || softmax(F^S))                          (Eq. 4)
    softmax over the globally pooled feature channels, temperature on the teacher only, batch mean:
    the argument order of the authors' code (diffusion.py, GaussianDiffusionSampler.RCFD:
    F.kl_div(log_softmax(feat_S), softmax(feat_T/temp)), reduction batchmean). Gradients flow through
    the frozen classifier into the student.
  - RCFD (default --variant rcfd), with p = softmax(cls(x^S)) (the classifier's class probabilities):
        L_entropy = mean_b(-sum_c p_c log p_c)                                 (Eq. 5)
        L_diversity = sum_c p^_c log p^_c,  p^ = mean_b p                      (Eq. 6)
        L_RCFD = L_CFD + beta*(gamma*L_entropy + (1-gamma)*L_diversity)        (Eq. 7)
    Under torchrun, p^ is the mean over each process's share of the batch, as in the authors' code
    (Diversity() on each GPU's batch of RCFD.py's DistributedDataParallel run).
    Per-stage tau/beta/gamma default to the paper's ResNet-18 settings (App. C.4). --variant cfd is
    beta = 0, the L_CFD-only ablation (Tables 2-3), here with the ResNet-18 classifier and its taus:
    the paper gives no ResNet-18 L_CFD-only tau (its DenseNet-201 runs use 0.9/1/0.85: --tau).
  - Adam, cosine-annealed lr, gradient clip 1, student copied from its teacher each stage (App. C.4;
    the authors' RCFD.py: CosineAnnealingLR over the stage); App. C.4's "20000 for 4 to 1-step" read as
    the 4->2 and 2->1 stages (the paper preset doubles stages whose student has <= 2 steps; METHODS.md
    reads it as 2->1 only). Training images are flipped left-right at random (--xflip, on by default:
    RCFD.py's RandomHorizontalFlip), in the PD chain too.
  - The classifier: a ResNet-18-style net (He et al. 2016; CIFAR stem, smaller in smoke/lab), trained
    here on the dataset's labels on first use and cached in runs/<dataset>/classifier-<preset>/ with
    its test accuracy, or --classifier PATH.
  - metrics.json compares RCFD with plain PD at the same stage: pd.py's metrics.json for the same
    NFE and chain if present (pd_baseline), or, with --pd-baseline, a plain-PD run of the same CFD
    stages with the same updates, batch, lr and data/noise draws (but PD's linear lr anneal, not
    CFD's cosine), evaluated the same way into <out>/pd-baseline/nfe<N>/.
  - Stage files and checkpoints live in runs/<dataset>/<variant>-<preset>/; each evaluated NFE writes
    its metrics.json and samples.png into nfe<N>/ there (as pd.py does), so `--nfe 2 --resume` keeps
    the 4-step result. --resume after changing --teacher, --classifier, --tau/--beta/--gamma or
    --variant is refused.

Deviations from the paper and the authors' code, and why (all fewstep's own choices):
  - Teacher: fewstep's shared EDM denoiser, called through the cosine VP adapter (as pd.py).
  - Schedule: pd.py's continuous-time cosine log-SNR schedule (t in [0, 1], t = (i+1)/N), not the CFD
    paper's: "the cosine schedule introduced in [8]" (Sec. 4.1), iDDPM's discrete cosine alpha_bar
    (s = 0.008, betas clipped at 0.999) on a 1024-step integer grid (the authors' diffusion.py,
    make_beta_cosine; t in {2, 4, ..., T} for a T-step teacher). Why: one schedule for PD and CFD, so
    the PD chain's files are shared with pd.py and RCFD is compared with PD on the same grid. In EDM
    sigma = sqrt((1 - alpha_bar)/alpha_bar) the authors' grid has t = 1: 2.08e4, 1016/1024: 82.2,
    7/8: 5.07, 1/2: 1.014, 1/8: 0.211, 2/1024: 0.0116; pd.py's 80, 40.5, 4.76, 0.988, 0.197, 0.0031
    (pd.py's ends at the shared teacher's sigma_max = 80: see its header).
  - The PD chain anneals its lr linearly (pd.py's PD), where App. C.4's common setting says cosine
    for the whole 1024 -> 4 range; its updates, batch and lr are cfd.py's (App. C.4) in every preset.
  - The classifier recipe is not the authors' (classifier/train.py: SGD momentum 0.9, lr 0.1 divided
    by 10 at epochs 150 and 225, weight decay 5e-4, batch 128, 300 epochs, random crop with 4-pixel
    padding, flips, AutoAugment's CIFAR-10 policy and Cutout 16): here Adam with a cosine lr, no
    augmentation and no weight decay, on rank 0 only (a cheap preliminary; BatchNorm statistics then
    need no synchronisation), for about 30 epochs in the paper preset; lab uses a narrow 4-stage ResNet
    (one block per stage) trained for one epoch so the 2-core CPU run stays within minutes. The
    classifier sees images in [-1, 1] as the diffusion model outputs them (METHODS.md 5).
  - Lab starts PD at 32 steps with pd.py's lab budget (not 1024) and trains each CFD stage for the same
    few hundred updates as a pd.py lab stage, so the two compare at equal budget.

Run:
  python cfd.py --dataset fashion --nfe 4                          # CPU lab: PD 32->16->8, RCFD 8->4
  python cfd.py --dataset fashion --nfe 4 --pd-baseline            # + plain PD 8->4 at the same budget
  python cfd.py --dataset cifar10 --preset paper --nfe 1           # CUDA: PD 1024->8, RCFD 8->4->2->1
  torchrun --nproc_per_node=2 cfd.py --preset smoke                # two processes (gloo on CPU)
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fid
import pd
from common import (RUNS, Dist, UserError, check_data_shape, check_exports, common_parser, dataset_slug, fingerprint,
                    first_paragraph, learning_rate, load_checkpoint, load_dataset, load_state, load_teacher,
                    main_guard, prepare_out_dir, run_dir, save_checkpoint, seed_all, to_float, vp_predict)

# ----------------------------------------------------------------------------------------------
# Arguments and presets
# ----------------------------------------------------------------------------------------------

PRESETS = {
    # start_steps, iters, batch, lr, later_*: as pd.py (for the PD chain and the CFD stages alike);
    # cfd_from: the PD chain stops here and CFD takes over; cls: classifier width/blocks and training images/batch/lr.
    "smoke": dict(start_steps=16, cfd_from=8, iters=3, batch=8, lr=1e-4, later_factor=1.0, later_steps=2,
                  ckpt_every=2, cls=dict(width=8, blocks=(1, 1), images=256, batch=32, lr=3e-3)),
    "lab": dict(start_steps=32, cfd_from=8, iters=300, batch=32, lr=2e-4, later_factor=1.0, later_steps=2,
                ckpt_every=100, cls=dict(width=16, blocks=(1, 1, 1, 1), images=60_000, batch=128, lr=3e-3)),
    # App. C.3/C.4: base sampler 1024 steps, PD to 8; common setting Adam 5e-5 cosine, batch 128, clip 1,
    # 10k updates (20k "for 4 to 1-step"); ResNet-18 classifier (about 30 epochs of CIFAR-10 here).
    "paper": dict(start_steps=1024, cfd_from=8, iters=10_000, batch=128, lr=5e-5, later_factor=2.0, later_steps=2,
                  ckpt_every=1_000, cls=dict(width=64, blocks=(2, 2, 2, 2), images=1_500_000, batch=128, lr=1e-3)),
}
BUDGET = ("iters", "batch", "lr", "later_factor", "later_steps")          # pd.py's folder is shared when these match
# App. C.4, RCFD (ResNet-18): (tau, beta, gamma) by the student's steps of the stage.
STAGE_HPARAMS = {4: (0.95, 0.003, 0.75), 2: (0.95, 0.003, 0.75), 1: (0.85, 0.003, 0.5)}


def parse_args(argv=None):
    p = common_parser(first_paragraph(__doc__), nfe_default=4,
                      nfe_help="N, the final student's DDIM steps (a power of two below --cfd-from)")
    p.add_argument("--variant", default="rcfd", choices=["rcfd", "cfd"], help="rcfd: Eq. 7 (default); cfd: Eq. 4 only (beta = 0)")
    p.add_argument("--tau", type=float, default=None, help="teacher softmax temperature tau of Eq. 4 for every "
                   "CFD stage (default: the paper's per stage, 0.95/0.95/0.85 for 4/2/1 steps)")
    p.add_argument("--beta", type=float, default=None, help="beta of Eq. 7 (default: the paper's 0.003; 0 for --variant cfd)")
    p.add_argument("--gamma", type=float, default=None, help="gamma of Eq. 7 (default: the paper's 0.75, 0.5 at 1 step)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (default: runs/<dataset>/classifier-<preset>/"
                   "classifier.pt, trained on first use)")
    p.add_argument("--cls-images", type=int, default=None, help="classifier training length in images (default: "
                   "the preset's; paper ~30 epochs)")
    p.add_argument("--cfd-from", type=int, default=None, help="steps of the PD student CFD starts from (paper 8)")
    p.add_argument("--pd-dir", default=None, help="folder of the PD chain (default: pd.py's, runs/<dataset>/pd-<preset>, "
                   "if the budget is pd.py's preset's, else runs/<dataset>/pd-<preset>-cfd-budget)")
    p.add_argument("--pd-baseline", action="store_true", help="also train and evaluate plain PD on the same stages "
                   "with the same updates, batch and lr, linear anneal (into <out>/pd-baseline/nfe<N>/)")
    p.add_argument("--start-steps", type=int, default=None, help="DDIM steps of the original teacher (paper 1024)")
    p.add_argument("--iters", type=int, default=None, help="updates per stage, PD chain included (paper 10k; "
                   "default: the preset's)")
    p.add_argument("--lr", type=learning_rate, default=None, help="Adam lr at the start of each stage, cosine-annealed in CFD "
                   "stages, linearly in the PD chain (paper 5e-5)")
    p.add_argument("--later-factor", type=float, default=None, help="update multiplier for stages with <= --later-steps "
                   "student steps (paper 2)")
    p.add_argument("--later-steps", type=int, default=None, help="see --later-factor (default 2)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (paper 1.0)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=True, help="flip each training image "
                   "left-right with probability 1/2, PD chain included (the authors' RandomHorizontalFlip; default on)")
    p.add_argument("--ckpt-every", type=int, default=None, help="updates between checkpoints (default: the preset's)")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    for key in ("start_steps", "cfd_from", "iters", "lr", "later_factor", "later_steps", "ckpt_every"):
        if getattr(args, key) is None:
            setattr(args, key, cfg[key])
    args.batch = args.batch_size or cfg["batch"]
    if args.tau is not None and args.tau <= 0:
        raise UserError(f"--tau {args.tau}: the temperature must be positive (paper: 0 < tau <= 1)")
    if args.gamma is not None and not 0 <= args.gamma <= 1:
        raise UserError(f"--gamma {args.gamma}: must lie in [0, 1] (Eq. 7)")
    if args.beta is not None and args.beta < 0:
        raise UserError(f"--beta {args.beta}: must be >= 0 (Eq. 7)")
    return args


def cfd_stages(args):
    """(PD stages down to --cfd-from, CFD stages down to --nfe), as student step counts."""
    if not pd.is_power_of_two(args.cfd_from) or args.cfd_from > args.start_steps:
        raise UserError(f"--cfd-from {args.cfd_from}: must be a power of two no larger than --start-steps {args.start_steps}")
    if not pd.is_power_of_two(args.nfe) or args.nfe >= args.cfd_from:
        raise UserError(f"--nfe {args.nfe}: CFD halves the {args.cfd_from}-step PD student (--cfd-from), so --nfe must "
                        f"be a power of two below {args.cfd_from} (1, 2, 4, ...)")
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
    hits = sum((cls(to_float(images[k:k + batch]).to(device))[1].argmax(1).cpu() == labels[k:k + batch]).sum().item()
               for k in range(0, len(images), batch))
    return hits / len(images)


def train_classifier(args, cfg, path, device):
    """Cross-entropy training on the dataset's labels (Adam, cosine lr); saves the net and its test accuracy."""
    images, labels = load_dataset(args.dataset, args.data_dir)
    if labels is None:
        raise UserError(f"{args.dataset} has no labels to train a classifier on: pass --classifier PATH")
    test_images, test_labels = load_dataset(args.dataset, args.data_dir, split="test")
    gen = torch.Generator().manual_seed(args.seed)
    cls = ResNet(images.shape[1], int(labels.max()) + 1, cfg["width"], cfg["blocks"]).to(device)
    opt = torch.optim.Adam(cls.parameters(), lr=cfg["lr"])
    steps = max(1, cfg["images"] // cfg["batch"])
    for k in tqdm(range(steps), desc="classifier", unit="it"):
        idx = torch.randint(len(images), (cfg["batch"],), generator=gen)
        _, logits = cls(to_float(images[idx]).to(device))
        loss = F.cross_entropy(logits, labels[idx].to(device))
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * cosine_anneal(k, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    cls.eval()
    acc = accuracy(cls, test_images, test_labels, device)
    save_checkpoint(path, "cfd-classifier", config=cls.config, net=cls.state_dict(), test_acc=acc,
                    dataset=args.dataset, images=steps * cfg["batch"])
    tqdm.write(f"classifier: {sum(p.numel() for p in cls.parameters()) / 1e6:.2f} M params, "
               f"{steps * cfg['batch']:,} images, test accuracy {acc:.4f}; saved {path}")


def load_classifier(args, pg, channels):
    """The frozen classifier: --classifier PATH, else the cached one of dataset and preset, trained
    first on rank 0. Returns (classifier, path, test accuracy)."""
    path = Path(args.classifier or RUNS / dataset_slug(args.dataset) / f"classifier-{args.preset}" / "classifier.pt")
    if not args.classifier and not path.exists() and pg.main:
        cfg = dict(PRESETS[args.preset]["cls"])
        cfg["images"] = args.cls_images or cfg["images"]
        train_classifier(args, cfg, path, pg.device)
    pg.barrier()
    ck = load_checkpoint(path, "cfd-classifier")
    if ck["config"]["in_ch"] != channels:
        raise UserError(f"{path}: a classifier of {ck['config']['in_ch']}-channel images, not {channels}")
    cls = ResNet(**ck["config"])
    load_state(cls, ck["net"], path)
    # Frozen (eval-mode BatchNorm, no parameter gradients), but differentiable in its input.
    return cls.to(pg.device).eval().requires_grad_(False), path, ck.get("test_acc")


# ----------------------------------------------------------------------------------------------
# The method: Eq. 4 (feature KL), Eqs. 5-6 (entropy, diversity), Eq. 7 (their sum)
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


def rcfd_loss(student, teacher, cls, x, eps, i, N, tau, beta, gamma):
    """One batch of a CFD stage: PD's z_t and target x~ (pd.teacher_target), Eq. 7 on the classifier's
    view of x^T = x~ and x^S = theta(z_t). Returns (loss, parts dict)."""
    t = (i.double() + 1) / N                                 # t = (i+1)/N, i ~ U{0..N-1} (as PD)
    alpha_t, sigma_t = pd.alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    x_T, _ = pd.teacher_target(teacher, z_t, t, N)           # Eq. 12
    x_S = vp_predict(student, z_t, alpha_t, sigma_t)[0]
    with torch.no_grad():
        F_T = cls.extr(x_T).float()                          # Eq. 3 (float: bf16 autocast on CUDA)
    F_S, logits = cls(x_S)
    p = F.softmax(logits.float(), dim=1)                     # Eq. 5: p = softmax(cls(x^S))
    parts = dict(cfd=cfd_loss(F_S.float(), F_T, tau), entropy=entropy_loss(p), diversity=diversity_loss(p))
    loss = parts["cfd"] + beta * (gamma * parts["entropy"] + (1 - gamma) * parts["diversity"])   # Eq. 7
    return loss, parts


def stage_loss(cls, tau, beta, gamma):
    """pd.train_stage's loss_fn for a CFD stage: Eq. 7 with this stage's (tau, beta, gamma)."""
    return lambda student, teacher, x, eps, i, N: rcfd_loss(student, teacher, cls, x, eps, i, N, tau, beta, gamma)[0]


def cosine_anneal(k, iters):
    """App. C.4: the lr factor 0.5*(1 + cos(pi*k/iters)), from 1 to 0 over a stage."""
    return 0.5 * (1 + math.cos(math.pi * k / iters))


# ----------------------------------------------------------------------------------------------
# The chain: pd.py's stage files, then CFD stages (pd.run_chain with Eq. 7 in place of the image MSE)
# ----------------------------------------------------------------------------------------------

def pd_chain_dir(args):
    """The PD chain's folder: --pd-dir, else pd.py's when cfd.py's budget is pd.py's preset's (smoke,
    lab), else its own, so pd.py's paper chain (50k updates per stage) is never mixed with App. C.4's."""
    if args.pd_dir:
        return Path(args.pd_dir)
    same = all(getattr(args, k) == pd.PRESETS[args.preset][k] for k in BUDGET)
    return RUNS / dataset_slug(args.dataset) / (f"pd-{args.preset}" if same else f"pd-{args.preset}-cfd-budget")


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

def bench_step(teacher, preset, device, batch=None):
    """One update of an RCFD stage (PD's two teacher calls, the student, the classifier on both images).
    Unit: images; budget: the preset's whole chain to 1 step, PD 1024 -> 8 and RCFD 8 -> 1, every update
    priced at RCFD's cost (the PD updates, without the classifier, are cheaper: an upper bound)."""
    from common import autocast, image_shape
    cfg = PRESETS[preset]
    batch = batch or cfg["batch"]
    in_ch = image_shape(teacher.net)[0]
    cls = ResNet(in_ch, 10, cfg["cls"]["width"], cfg["cls"]["blocks"]).to(device).eval().requires_grad_(False)
    student = pd.make_student(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    loss_fn = stage_loss(cls, *STAGE_HPARAMS[4])
    stages = pd.stage_steps(cfg["cfd_from"], cfg["start_steps"]) + pd.stage_steps(1, cfg["cfd_from"])
    updates = sum(round(cfg["iters"] * (cfg["later_factor"] if N <= cfg["later_steps"] else 1)) for N in stages)
    shape = image_shape(student.net)

    def step():
        x = torch.rand((batch, *shape), device=device) * 2 - 1
        eps, i = torch.randn((batch, *shape), device=device), torch.randint(4, (batch,))
        with autocast(device):
            loss = loss_fn(student, teacher, x, eps, i, 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    return dict(step=step, unit="images", per_step=batch, total=updates * cfg["batch"],
                nets=[teacher.net, student.net, cls])


def main(argv=None):
    args = parse_args(argv)
    pd_stages, stages = cfd_stages(args)
    pg = Dist(args.device)
    out, folder = run_dir(args, f"{args.variant}-{args.preset}"), prepare_out_dir(pd_chain_dir(args))
    check_exports(args, out / f"nfe{args.nfe}")
    data, _ = load_dataset(args.dataset, args.data_dir)
    seed_all(args.seed)
    teacher, teacher_path = load_teacher(args, pg)
    check_data_shape(data, teacher, args.dataset)
    cls, cls_path, cls_acc = load_classifier(args, pg, data.shape[1])
    gen = torch.Generator().manual_seed(args.seed * 1000 + pg.rank)          # each process its own data/noise
    hparams = {N: stage_hparams(args, N) for N in stages}
    pg.log(f"cfd: {args.dataset}, preset {args.preset}, PD {args.start_steps} -> {args.cfd_from} steps in {folder}, then "
           f"{args.variant} -> {' -> '.join(map(str, stages))} (tau, beta, gamma {hparams}); classifier {cls_path} "
           f"(test acc {cls_acc}); {args.iters:,} updates of {args.batch} per stage, {pg.world} process(es) on {pg.device}")
    chain = dict(start_steps=args.start_steps, teacher_sha256=fingerprint(teacher_path), xflip=args.xflip)   # as pd.main
    try:                                     # pd.py's stage files: reused whatever --resume says
        start, _, state = pd.run_chain(args, pg, data, teacher, pd_stages, folder, chain, gen, reuse=True)
    except UserError as e:
        raise UserError(f"{e} (cfd.py's PD chain, folder {folder}: set by --pd-dir)") from None
    prefix, pd_gen = dict(state), gen.get_state()                            # for the --pd-baseline below
    chain = dict(chain, cfd_from=args.cfd_from)                               # the stages below start from it
    cfd_chain = dict(chain, variant=args.variant, classifier_sha256=fingerprint(cls_path))
    student = start                                                           # the --cfd-from-step PD student
    for N in stages:                         # eta <- theta, each CFD stage with its (tau, beta, gamma) (App. C.4)
        tau, beta, gamma = hparams[N]
        student, _, state = pd.run_chain(args, pg, data, student, [N], out, dict(cfd_chain, tau=tau, beta=beta, gamma=gamma),
                                         gen, state=state, loss_fn=stage_loss(cls, tau, beta, gamma),
                                         lr_factor=cosine_anneal, kind="cfd")
    # Plain PD at the same stages and budget: pd.py's own run, or (--pd-baseline) one trained here from
    # the same --cfd-from-step student with the same updates, batch, lr and data/noise draws.
    baseline = pd_metrics(folder, args, chain["teacher_sha256"])
    if args.pd_baseline:
        b_out, b_gen = out / "pd-baseline", torch.Generator()
        b_gen.set_state(pd_gen)
        b, _, b_state = pd.run_chain(args, pg, data, start, stages, b_out, chain, b_gen, state=prefix)
        info = dict(method="pd", variant="pd-baseline", nfe=args.nfe, train_seconds=b_state["seconds"],
                    images_seen=b_state["images"], start_steps=args.start_steps, stages=stages, iters_per_stage=args.iters)
        m = fid.report(args, pg, b_out / f"nfe{args.nfe}", teacher, teacher_path, lambda eps: pd.sample_ddim(b, eps, args.nfe),
                       info, data.shape[1:])
        if pg.main:
            baseline = {k: m[k] for k in ("fid", "fid_n", "teacher_rms", "images_seen")} | {
                "source": str(b_out / f"nfe{args.nfe}" / "metrics.json"), "same_budget": True}
    if baseline:
        pg.log(f"plain PD at {args.nfe} steps ({baseline['source']}): FID {baseline['fid']}, "
               f"teacher_rms {baseline['teacher_rms']:.4f}, {baseline['images_seen']:,} images")
    info = dict(method="cfd", variant=args.variant, nfe=args.nfe, train_seconds=state["seconds"], images_seen=state["images"],
                start_steps=args.start_steps, cfd_from=args.cfd_from, pd_dir=str(folder), pd_stages=pd_stages, stages=stages,
                stage_hparams={N: dict(zip(("tau", "beta", "gamma"), h)) for N, h in hparams.items()},
                iters_per_stage=args.iters, lr=args.lr, batch=args.batch, xflip=args.xflip, classifier=str(cls_path),
                classifier_test_acc=cls_acc, pd_baseline=baseline, sampler="DDIM, x_hat clipped to [-1, 1]")
    # The report compares with the original teacher's solvers.
    fid.report(args, pg, out / f"nfe{args.nfe}", teacher, teacher_path, lambda eps: pd.sample_ddim(student, eps, args.nfe),
               info, data.shape[1:])
    pg.close()


if __name__ == "__main__":
    main_guard(main)
