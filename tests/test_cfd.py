"""Tests of cfd.py: the feature KL of Eq. 4 (direction, temperature on the teacher only, zero at
equality), entropy and diversity (Eqs. 5-6) against hand-computed values, Eq. 7's sum, the frozen
classifier passing gradients to the student, the image target being pd.py's; and the CLI: --nfe
and --cfd-from validation, an end-to-end smoke run (tiny classifier trained on the generated data, PD
chain reuse, plain-PD baseline, --resume mid-stage in the PD chain and in a CFD stage, refusal of a
changed chain), and torchrun with two processes."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cfd
import common
import fid
import pd
from conftest import MainSpy, check_run_pictures, gaussian_denoiser, run_script

torch.set_num_threads(2)
MU, VAR = 0.3, 0.2 ** 2


def altered_copy(src, dst):
    """A copy of a checkpoint with one weight changed: another network to fewstep, which knows networks by
    content (common.fingerprint), not by path."""
    ck = torch.load(src, weights_only=True)
    state = next(v for v in ck.values() if isinstance(v, dict) and any(torch.is_tensor(t) for t in v.values()))
    key = next(k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point())
    state[key] = state[key] + 1e-3
    torch.save(ck, dst)
    return dst


def cosine(t):
    """The cosine schedule written out independently: (alpha_t, sigma_t, EDM sigma = sigma_t/alpha_t)."""
    b = math.atan(math.exp(-20 / 2))               # lambda_max = 20
    a = math.atan(80.0) - b                           # lambda_min = -2 ln 80: EDM sigma 80 at t = 1
    logsnr = -2 * math.log(math.tan(a * t + b))
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr))), math.exp(-logsnr / 2)


def kl_by_hand(F_S, F_T, tau_S, tau_T):
    """KL(softmax(F_T/tau_T) || softmax(F_S/tau_S)), a loop over samples and channels."""
    total = 0.0
    for fs, ft in zip(F_S.tolist(), F_T.tolist()):
        zs, zt = sum(math.exp(v / tau_S) for v in fs), sum(math.exp(v / tau_T) for v in ft)
        for vs, vt in zip(fs, ft):
            p, q = math.exp(vs / tau_S) / zs, math.exp(vt / tau_T) / zt
            total += q * math.log(q / p)
    return total / len(F_S)


# --- Eq. 4 ------------------------------------------------------------------------------------

def test_kl_direction_and_temperature_on_the_teacher_only():
    g = torch.Generator().manual_seed(0)
    F_S, F_T = torch.randn(5, 7, generator=g, dtype=torch.float64), 2 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    tau = 0.85
    loss = cfd.cfd_loss(F_S, F_T, tau).item()
    assert loss == pytest.approx(kl_by_hand(F_S, F_T, 1.0, tau), rel=1e-6)
    # Not the reverse KL(student || teacher) ...
    rev = sum(sum(p * math.log(p / q) for p, q in zip(ps, qs)) for ps, qs in
              zip(torch.softmax(F_S, 1).tolist(), torch.softmax(F_T / tau, 1).tolist())) / len(F_S)
    assert abs(loss - rev) > 1e-3
    # ... and not the dual temperature of Eq. 8 (tau on both sides).
    assert abs(loss - kl_by_hand(F_S, F_T, tau, tau)) > 1e-3
    # tau only rescales the teacher's features: L(F_S, F_T, tau) = L(F_S, F_T/tau, 1).
    assert loss == pytest.approx(cfd.cfd_loss(F_S, F_T / tau, 1.0).item(), rel=1e-9)
    # A different tau moves the (teacher) target.
    assert cfd.cfd_loss(F_S, F_T, 0.5).item() != pytest.approx(loss, rel=1e-3)


def test_zero_at_tau_one_and_identical_features():
    F = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(cfd.cfd_loss(F, F.clone(), 1.0).item()) < 1e-12
    assert cfd.cfd_loss(F, F.clone(), 0.9).item() > 1e-4          # sharpening makes the target differ
    assert cfd.cfd_loss(F, F + 3.0, 1.0).item() == pytest.approx(0, abs=1e-12)   # softmax is shift-invariant


# --- Eqs. 5-7 ---------------------------------------------------------------------------------

def test_entropy_and_diversity_hand_computed():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert cfd.entropy_loss(p).item() == pytest.approx(math.log(2) / 2, rel=1e-6)            # (ln 2 + 0)/2
    assert cfd.diversity_loss(p).item() == pytest.approx(0.75 * math.log(0.75) + 0.25 * math.log(0.25), rel=1e-6)
    uniform = torch.full((3, 4), 0.25)
    assert cfd.entropy_loss(uniform).item() == pytest.approx(math.log(4), rel=1e-6)
    assert cfd.diversity_loss(uniform).item() == pytest.approx(-math.log(4), rel=1e-6)       # its minimum
    one_hot = torch.eye(4)                                       # confident and balanced: both at their minimum
    assert cfd.entropy_loss(one_hot).item() == pytest.approx(0, abs=1e-9)
    assert cfd.diversity_loss(one_hot).item() == pytest.approx(-math.log(4), rel=1e-6)


class Recorder(nn.Module):
    """Wraps a classifier and keeps the images its extractor and full net see."""

    def __init__(self, cls):
        super().__init__()
        self.cls, self.seen = cls, {}

    def extr(self, x):
        self.seen["extr"] = x.detach().clone()
        return self.cls.extr(x)

    def forward(self, x):
        self.seen["cls"] = x.detach().clone()
        return self.cls(x)


def draws(x, seed, N):
    """The (eps, i) rcfd_loss draws from a generator seeded with seed (no flips): pd.pd_loss's order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g), torch.randint(N, (len(x),), generator=g)


def test_image_target_is_pds_target():
    torch.manual_seed(0)
    teacher, student, N = gaussian_denoiser(MU, VAR), gaussian_denoiser(mu=-0.1, var=0.3), 4
    cls = Recorder(cfd.ResNet(1, 10, 4, (1,)).double().eval().requires_grad_(False))
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    cfd.rcfd_loss(student, teacher, x, torch.Generator().manual_seed(4), N, cls, 0.95, 0.003, 0.75)
    eps, i = draws(x, 4, N)
    assert set(i.tolist()) == {0, 1, 2, 3}
    t = (i.double() + 1) / N
    alpha_t, sigma_t = pd.alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    assert torch.equal(cls.seen["extr"], pd.teacher_target(teacher, z_t, t, N)[0])
    for k in range(len(x)):                                      # and independently, Eq. 12 (i >= 1)
        if i[k] == 0:
            continue
        a_t, s_t, sig_t = cosine(t[k].item())
        a_pp, s_pp, sig_pp = cosine(t[k].item() - 1 / N)
        x_pp = common.sample_euler(teacher, z_t[k:k + 1] / a_t, [sig_t, cosine(t[k].item() - 0.5 / N)[2], sig_pp])
        x_T = (a_pp * x_pp - s_pp / s_t * z_t[k:k + 1]) / (a_pp - s_pp / s_t * a_t)
        assert torch.allclose(cls.seen["extr"][k:k + 1], x_T, rtol=1e-5, atol=1e-6)
    # The classifier's other input is the student's x^S = theta(z_t), unclipped.
    assert torch.allclose(cls.seen["cls"], student(z_t / alpha_t, sigma_t / alpha_t), rtol=1e-6, atol=1e-7)
    # With --xflip the images are flipped first (pd.pd_loss's first draw), then eps and i follow.
    cfd.rcfd_loss(student, teacher, x, torch.Generator().manual_seed(4), N, cls, 0.95, 0.003, 0.75, xflip=True)
    g = torch.Generator().manual_seed(4)
    xf = pd.random_xflip(x, g)
    eps, i = torch.randn(x.shape, generator=g), torch.randint(N, (len(x),), generator=g)
    t = (i.double() + 1) / N
    z_t = pd.alpha_sigma(t, x)[0] * xf + pd.alpha_sigma(t, x)[1] * eps
    assert not torch.equal(xf, x) and torch.equal(cls.seen["extr"], pd.teacher_target(teacher, z_t, t, N)[0])


def test_classifier_frozen_student_gets_gradients_and_eq7_sums(tmp_path):
    torch.manual_seed(0)
    teacher = common.Denoiser(common.build_net(dict(in_ch=1, res=32, **common.NET_CONFIGS["smoke"]))).eval()
    teacher.requires_grad_(False)
    student = pd.make_student(teacher)
    with torch.no_grad():                            # x^S away from x^T, so that swapped features would show
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net = cfd.ResNet(1, 10, 4, (1, 1))
    net(torch.randn(8, 1, 32, 32))                   # give BatchNorm non-trivial running statistics (train mode)
    path = tmp_path / "classifier.pt"
    common.save_checkpoint(path, "cfd-classifier", config=net.config, net=net.state_dict(), test_acc=0.5)
    # The classifier as main() gets it: loaded from its checkpoint by cfd.load_classifier.
    cls, _, acc = cfd.load_classifier(cfd.parse_args(["--classifier", str(path)]), common.Dist("cpu"), 1)
    assert acc == 0.5 and not any(m.training for m in cls.modules())
    assert not any(p.requires_grad for p in cls.parameters())
    before = {k: v.clone() for k, v in cls.state_dict().items()}
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    N, tau, beta, gamma = 4, 0.9, 0.5, 0.25
    loss, parts = cfd.rcfd_loss(student, teacher, x, torch.Generator().manual_seed(3), N, cls, tau, beta, gamma)
    eps, i = draws(x, 3, N)                          # i = 2, 1, 0, 0, 1, 3: every grid point
    # Eq. 4 on the classifier's features of x^S and x^T, tau on the teacher's (not swapped).
    t = (i.double() + 1) / N
    alpha_t, sigma_t = pd.alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    with torch.no_grad():
        x_T = pd.teacher_target(teacher, z_t, t, N)[0]
        x_S = student(z_t / alpha_t, (sigma_t / alpha_t).flatten())
        F_S, F_T = cls.extr(x_S), cls.extr(x_T)
    assert parts["cfd"].item() == pytest.approx(cfd.cfd_loss(F_S, F_T, tau).item(), rel=1e-5)
    # ... not swapped, not at another tau, not on the class logits (Fig. 4's "prediction distribution").
    for wrong in (cfd.cfd_loss(F_T, F_S, tau), cfd.cfd_loss(F_S, F_T, 1.0), cfd.cfd_loss(cls.fc(F_S), cls.fc(F_T), tau)):
        assert parts["cfd"].item() != pytest.approx(wrong.item(), rel=1e-2)
    # Eqs. 5-6 on p = softmax(cls(x^S)), the class probabilities, not on the pooled features.
    p = torch.softmax(cls.fc(F_S), dim=1)
    assert parts["entropy"].item() == pytest.approx(cfd.entropy_loss(p).item(), rel=1e-5)
    assert parts["diversity"].item() == pytest.approx(cfd.diversity_loss(p).item(), rel=1e-5)
    p_feat = torch.softmax(F_S, dim=1)
    assert parts["entropy"].item() != pytest.approx(cfd.entropy_loss(p_feat).item(), rel=1e-2)
    # ... and p is not detached: entropy and diversity each reach the student.
    for term in ("entropy", "diversity"):
        g = torch.autograd.grad(parts[term], list(student.parameters()), retain_graph=True, allow_unused=True)
        assert sum(x.abs().sum().item() for x in g if x is not None) > 0, term
    # The feature KL alone reaches the student (through the frozen classifier).
    parts["cfd"].backward(retain_graph=True)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    student.zero_grad(set_to_none=True)
    loss.backward()
    expected = parts["cfd"] + beta * (gamma * parts["entropy"] + (1 - gamma) * parts["diversity"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and parts["cfd"].item() > 0
    assert all(p.grad is None for p in cls.parameters())
    assert all(torch.equal(before[k], v) for k, v in cls.state_dict().items())      # BN statistics too
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    # The loss a stage trains with is Eq. 7 with that stage's hyperparameters: at 1 step, --variant cfd, it is
    # Eq. 4 alone at the paper's tau = 0.85.
    hp = cfd.stage_hparams(cfd.parse_args(["--variant", "cfd"]), 1)
    assert hp == (0.85, 0.0, 0.5)
    t1 = torch.ones(6, dtype=torch.float64)
    eps, _ = draws(x, 6, 1)
    z_1 = pd.alpha_sigma(t1, x)[0] * x + pd.alpha_sigma(t1, x)[1] * eps
    with torch.no_grad():
        stage, _ = cfd.rcfd_loss(student, teacher, x, torch.Generator().manual_seed(6), 1, cls, *hp)
        a1, s1 = pd.alpha_sigma(t1, x)
        F_S1 = cls.extr(student(z_1 / a1, (s1 / a1).flatten()))
        F_T1 = cls.extr(pd.teacher_target(teacher, z_1, t1, 1)[0])
    assert stage.item() == pytest.approx(cfd.cfd_loss(F_S1, F_T1, 0.85).item(), rel=1e-5)
    assert stage.item() != pytest.approx(cfd.cfd_loss(F_S1, F_T1, 0.95).item(), rel=1e-2)


# --- The command line -------------------------------------------------------------------------

def test_nfe_validation(tmp_path, capsys):
    args = cfd.parse_args(["--preset", "lab", "--nfe", "4"])
    assert cfd.cfd_stages(args) == ([16, 8], [4])
    assert cfd.cfd_stages(cfd.parse_args(["--preset", "paper", "--nfe", "1"]))[1] == [4, 2, 1]
    for nfe in (3, 8, 16, 0):
        with pytest.raises(common.UserError):
            cfd.cfd_stages(cfd.parse_args(["--preset", "lab", "--nfe", str(nfe)]))
    assert cfd.stage_hparams(cfd.parse_args(["--nfe", "1"]), 1) == (0.85, 0.003, 0.5)
    assert cfd.stage_hparams(cfd.parse_args(["--variant", "cfd"]), 4) == (0.95, 0.0, 0.75)
    r = run_script("cfd.py", "--preset", "smoke", "--nfe", "3", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "power of two" in r.stderr
    with pytest.raises(SystemExit) as e:
        common.main_guard(lambda: cfd.main(["--preset", "smoke", "--nfe", "8"]))      # smoke: CFD from 8 steps
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "below 8" in err
    assert cfd.cfd_stages(cfd.parse_args(["--preset", "smoke"])) == ([8], [4])       # the bare smoke command works
    for bad in ("6", "64"):                                                           # lab starts at 32 steps
        with pytest.raises(common.UserError, match=f"^--cfd-from {bad}:"):
            cfd.cfd_stages(cfd.parse_args(["--preset", "lab", "--cfd-from", bad]))
    # The PD chain shares pd.py's folder only at pd.py's preset budget (lab, unchanged); paper (10k updates) has its own.
    assert cfd.pd_chain_dir(cfd.parse_args([])) == common.RUNS / "fashion" / "pd-lab"
    assert cfd.pd_chain_dir(cfd.parse_args(["--preset", "paper"])) == common.RUNS / "fashion" / "pd-paper-cfd-budget"
    assert cfd.pd_chain_dir(cfd.parse_args(["--iters", "500"])) == common.RUNS / "fashion" / "pd-lab-cfd-budget"
    assert {k: cfd.PRESETS["lab"][k] for k in cfd.BUDGET} == {k: pd.PRESETS["lab"][k] for k in cfd.BUDGET}   # shared_pd


def smoke_args(fashion_dir, smoke_teacher, out, *extra):
    return ["--preset", "smoke", "--data-dir", str(fashion_dir), "--teacher", str(smoke_teacher),
            "--out", str(out), "--nfe", "2", "--start-steps", "8", "--cfd-from", "4", *map(str, extra)]


def test_smoke_run_baseline_reuse_and_resume(fashion_dir, smoke_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--pd-baseline"))
    a = tmp_path / "a"
    m = json.loads((a / "nfe2" / "metrics.json").read_text())
    assert m["method"] == "cfd" and m["variant"] == "rcfd" and m["nfe"] == 2 and (a / "nfe2" / "samples.png").exists()
    assert m["pd_stages"] == [4] and m["stages"] == [2] and m["xflip"] is True
    rows = check_run_pictures(a / "nfe2", ["pd 8 -> 4 steps", "cfd 4 -> 2 steps"])
    assert rows[0][2:] == ["loss", "cfd", "entropy", "diversity"]           # RCFD's parts, blank on PD's rows
    assert m["images_seen"] == 2 * 3 * 8                         # PD 8->4 and RCFD 4->2, 3 updates of 8
    cls_ck = common.load_checkpoint(tmp_path / "runs" / "fashion" / "classifier-smoke" / "classifier.pt", "cfd-classifier")
    assert m["classifier_test_acc"] == cls_ck["test_acc"]                # the saved classifier's (cfd.accuracy: its test)
    b = json.loads((a / "pd-baseline" / "nfe2" / "metrics.json").read_text())       # the baseline run's own record
    assert m["pd_baseline"]["teacher_rms"] == b["teacher_rms"] and b["variant"] == "pd-baseline"
    assert m["pd_baseline"]["images_seen"] == b["images_seen"] == m["images_seen"]
    assert (tmp_path / "runs" / "fashion" / "classifier-smoke" / "classifier.pt").exists()
    assert (tmp_path / "runs" / "fashion" / "pd-smoke" / "student-4steps.pt").exists()   # pd.py's stage file
    # A second run reuses pd.py's 4-step student (and its RNG state: the CFD stage equals run a's) and
    # the cached classifier.
    capsys.readouterr()
    cfd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "b"))
    log = capsys.readouterr()
    assert "resuming pd 8 -> 4 steps at 3 of 3 updates" in log.out + log.err and "classifier:" not in log.out + log.err
    weights = lambda run: common.load_checkpoint(tmp_path / run / "student-2steps.pt", "cfd-student")["net"]
    wa, wb = weights("a"), weights("b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "reusing a PD stage file must continue its RNG"
    # Interrupted after the first checkpoint of the PD stage (own --pd-dir), then after the RCFD stage's:
    # each --resume continues at that update, and the end is where the straight runs were.
    c, c_pd = tmp_path / "c", tmp_path / "c-pd"
    real_save, stopped = common.save_checkpoint, set()

    def save_then_stop(path, kind, **payload):
        real_save(path, kind, **payload)
        if kind in ("pd-student", "cfd-student") and payload.get("finished") is False and kind not in stopped:
            stopped.add(kind)
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cfd.main(smoke_args(fashion_dir, smoke_teacher, c, "--pd-dir", c_pd))
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        cfd.main(smoke_args(fashion_dir, smoke_teacher, c, "--pd-dir", c_pd, "--resume"))
    log = capsys.readouterr()
    assert "resuming pd 8 -> 4 steps at 2 of 3 updates" in log.out + log.err
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    cfd.main(smoke_args(fashion_dir, smoke_teacher, c, "--pd-dir", c_pd, "--resume"))
    log = capsys.readouterr()
    assert "resuming cfd 4 -> 2 steps at 2 of 3 updates" in log.out + log.err
    p4 = common.load_checkpoint(tmp_path / "runs" / "fashion" / "pd-smoke" / "student-4steps.pt", "pd-student")["net"]
    c4 = common.load_checkpoint(c_pd / "student-4steps.pt", "pd-student")["net"]
    assert all(torch.equal(p4[k], c4[k]) for k in p4), "a resumed PD stage must equal an uninterrupted one"
    wc = weights("c")
    assert all(torch.equal(wb[k], wc[k]) for k in wb), "a resumed stage must equal an uninterrupted one"
    # --resume with another tau, classifier or teacher is refused, naming what changed.
    with pytest.raises(common.UserError, match=r"tau 0\.95 \(now 0\.5\)"):
        cfd.main(smoke_args(fashion_dir, smoke_teacher, c, "--pd-dir", c_pd, "--resume", "--tau", 0.5))
    other = altered_copy(tmp_path / "runs" / "fashion" / "classifier-smoke" / "classifier.pt", tmp_path / "other.pt")
    with pytest.raises(common.UserError, match="classifier"):
        cfd.main(smoke_args(fashion_dir, smoke_teacher, c, "--pd-dir", c_pd, "--resume", "--classifier", other))
    teacher2 = altered_copy(smoke_teacher, tmp_path / "teacher2.pt")     # a byte-identical copy is the same teacher
    with pytest.raises(common.UserError, match="another teacher.*--pd-dir"):
        cfd.main(smoke_args(fashion_dir, smoke_teacher, c, "--pd-dir", c_pd, "--resume", "--teacher", teacher2))


def test_each_cfd_stage_trains_eq7_with_its_own_tau(fashion_dir, smoke_teacher, tmp_path, monkeypatch):
    """main(): after the PD chain (8 -> 4, pd.py's loss, linear lr), each CFD stage (4 -> 2, 2 -> 1) is given Eq. 7
    (rcfd_loss) at the paper's (tau, beta, gamma) of that stage (App. C.4) and the cosine lr. pd.train_stage is
    replaced by one evaluation of the loss it is given (the loop itself is test_pd's)."""
    monkeypatch.chdir(tmp_path)
    calls, real = [], cfd.rcfd_loss

    def spy(student, teacher, x, gen, N, cls, tau, beta, gamma, xflip=False):
        calls.append(("rcfd", N, tau, beta, gamma))
        return real(student, teacher, x, gen, N, cls, tau, beta, gamma, xflip)

    def one_evaluation(pg, loss, budget, student, path, kind, settings, gen, reuse, resume, totals, **loop):
        calls.append(("stage", int(path.stem[len("student-"):-len("steps")]), budget.schedule.__name__,
                      settings.get("tau")))
        loss(student, loop["teacher"], common.to_float(loop["data"][:2]), gen)
        student.eval().requires_grad_(False)
        return totals

    monkeypatch.setattr(cfd, "rcfd_loss", spy)
    monkeypatch.setattr(pd, "train_stage", one_evaluation)
    monkeypatch.setattr(fid, "report", lambda *a, **k: None)
    net = cfd.ResNet(1, 10, 4, (1,))
    common.save_checkpoint(tmp_path / "cls.pt", "cfd-classifier", config=net.config, net=net.state_dict(), test_acc=0.5)
    cfd.main(["--preset", "smoke", "--data-dir", str(fashion_dir), "--teacher", str(smoke_teacher), "--out",
              str(tmp_path / "spy"), "--nfe", "1", "--start-steps", "8", "--cfd-from", "4", "--classifier",
              str(tmp_path / "cls.pt")])
    assert calls == [("stage", 4, "linear_anneal", None),
                     ("stage", 2, "cosine_anneal", 0.95), ("rcfd", 2, 0.95, 0.003, 0.75),
                     ("stage", 1, "cosine_anneal", 0.85), ("rcfd", 1, 0.85, 0.003, 0.5)]


def test_torchrun_two_processes(fashion_dir, smoke_teacher, tmp_path):
    r = run_script("cfd.py", *smoke_args(fashion_dir, smoke_teacher, tmp_path / "ddp"), cwd=tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "nfe2" / "metrics.json").read_text())
    assert m["method"] == "cfd" and m["images_seen"] == 2 * 3 * 8
    assert r.stdout.strip().splitlines()[-1].startswith("rcfd fashion NFE 2: student")


# --- The paper preset, every term of Eq. 7, the schedules, the classifier, and what main builds ---------------

# (key, value, source: zju-SWJ/RCFD config/CIFAR10_RCFD.txt and RCFD.py; the paper's App. C.3-C.4)
PAPER = [("lr", 5e-5, "CIFAR10_RCFD.txt --lr=5e-5 (Adam)"), ("batch", 128, "--batch_size=128"),
         ("grad_clip", 1.0, "--grad_clip=1.0"), ("iters", 10_000, "--total_steps=10000"),
         ("start_steps", 1024, "App. C.3: a 1024-step base sampler"), ("cfd_from", 8, "App. C.3: PD down to 8 steps"),
         ("later_factor", 2.0, "App. C.4: 20000 for 4 to 1-step"), ("later_steps", 2, "read as the 4->2, 2->1 stages"),
         ("xflip", True, "RCFD.py: RandomHorizontalFlip"), ("variant", "rcfd", "Eq. 7"),
         ("cls_width", 64, "App. C.4: ResNet-18"), ("cls_blocks", (2, 2, 2, 2), "ResNet-18")]


@pytest.mark.parametrize("key,value,source", PAPER)
def test_paper_preset_values(key, value, source):
    assert getattr(cfd.parse_args(["--preset", "paper"]), key) == value, source


def test_stage_hyperparameters_are_app_c4s_and_every_term_moves_the_gradient():
    """(tau, beta, gamma) of App. C.4 (ResNet-18): 0.95/0.003/0.75 at 4 and 2 steps, 0.85/0.003/0.5 at 1; by default
    beta > 0 and 0 < gamma < 1, so the feature KL, the entropy and the diversity each change the student's gradient."""
    args = cfd.parse_args([])
    assert [cfd.stage_hparams(args, N) for N in (4, 2, 1)] == [(0.95, 0.003, 0.75), (0.95, 0.003, 0.75), (0.85, 0.003, 0.5)]
    torch.manual_seed(0)
    teacher = common.Denoiser(common.build_net(dict(in_ch=1, res=32, **common.NET_CONFIGS["smoke"]))).eval()
    teacher.requires_grad_(False)
    student = pd.make_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cls = cfd.ResNet(1, 10, 4, (1, 1)).eval().requires_grad_(False)
    x = torch.rand(6, 1, 32, 32) * 2 - 1

    loss, parts = cfd.rcfd_loss(student, teacher, x, torch.Generator().manual_seed(3), 4, cls, 0.95, 0.003, 0.75)
    grad = lambda v: torch.cat([g.flatten() for g in torch.autograd.grad(v, list(student.parameters()), retain_graph=True)])
    terms = [grad(parts["cfd"]), 0.003 * 0.75 * grad(parts["entropy"]), 0.003 * 0.25 * grad(parts["diversity"])]
    full = grad(loss)
    assert torch.allclose(full, sum(terms), rtol=1e-3, atol=1e-5 * full.abs().max().item())
    for k, term in enumerate(terms):                   # each term, with its Eq. 7 weight, is a visible part of it
        assert term.abs().max() > 1e-4 * full.abs().max(), k


def test_cosine_anneal_and_accuracy_values():
    """App. C.4's cosine lr (RCFD.py's CosineAnnealingLR over the stage) and the classifier's test accuracy."""
    assert [cfd.cosine_anneal(2.0, d, 8) for d in (0, 2, 4, 8)] == pytest.approx([2.0, 1 + 2 ** -0.5, 1.0, 0.0])
    values = torch.tensor([0, 200, 0, 200, 0, 0, 200, 200], dtype=torch.uint8)
    images, labels = values.reshape(8, 1, 1, 1).expand(8, 1, 4, 4).contiguous(), torch.tensor([0, 1, 0, 1, 0, 1, 1, 1])
    guess = lambda x: (None, torch.stack([torch.zeros(len(x)), x.flatten(1)[:, 0]], 1))   # class 1 where x > 0
    assert cfd.accuracy(guess, images, labels, "cpu", batch=3) == 7 / 8                  # it sees x in [-1, 1]


def test_main_builds_the_classifier_the_pd_chain_and_the_cfd_stages(fashion_dir, random_teacher, tmp_path, monkeypatch):
    """What cfd.main hands its loops and the report (MainSpy): the classifier trains alone (Adam at cls_lr, cosine lr)
    on the images in [-1, 1] with their labels, in train mode, then is frozen in eval mode; the PD chain's stages use
    pd_loss and the linear anneal; the CFD stages rcfd_loss with their (tau, beta, gamma), the frozen classifier and the
    flips, the cosine anneal, each student starting from the previous stage's (the first from the --cfd-from-step PD
    student); the report samples the last student in eval mode with clipped DDIM."""
    monkeypatch.chdir(tmp_path)
    spy, real, seen = MainSpy(monkeypatch), cfd.rcfd_loss, []

    def probe(loop):
        if loop["kind"] == "cfd-student":
            cfd.rcfd_loss = lambda *a: seen.append(a) or (torch.zeros(()), {})
            try:
                loop["loss"](loop["student"], loop["teacher"], torch.rand(2, 1, 32, 32) * 2 - 1, torch.Generator())
            finally:
                cfd.rcfd_loss = real
    spy.probe = probe
    cfd.main(["--preset", "smoke", "--nfe", "1", "--start-steps", "8", "--cfd-from", "4", "--data-dir", str(fashion_dir),
              "--teacher", str(random_teacher), "--out", str(tmp_path / "run")])
    kinds = [loop["kind"] for loop in spy.loops]
    assert kinds == ["cfd-classifier-training", "pd-student", "cfd-student", "cfd-student"]
    c = spy.loops[0]
    cls, cfg = c["student"], cfd.PRESETS["smoke"]
    assert type(c["opt"]) is torch.optim.Adam and c["opt"].param_groups[0]["lr"] == cfg["cls_lr"] and c["training"]["net"]
    assert c["budget"].schedule is cfd.cosine_anneal and c["budget"].total == cfg["cls_images"] // cfg["cls_batch"]
    images, labels = common.load_dataset("fashion", fashion_dir)
    idx = torch.tensor([0, 5, 9])
    assert torch.allclose(c["loss"](cls, None, idx, None), F.cross_entropy(cls((images[idx].float() - 127.5) / 127.5)[1],
                                                                          labels[idx]))
    pd_loop, stages = spy.loops[1], spy.loops[2:]
    assert pd_loop["budget"].schedule is pd.linear_anneal and pd_loop["path"].name == "student-4steps.pt"
    previous = pd_loop["student"]
    for loop, N, (tau, beta, gamma) in zip(stages, (2, 1), ((0.95, 0.003, 0.75), (0.85, 0.003, 0.5))):
        b = loop["budget"]
        assert b.schedule is cfd.cosine_anneal and (b.lr, b.clip, b.total) == (1e-4, 1.0, 3)   # later_factor 1
        assert type(loop["opt"]) is torch.optim.Adam and loop["student_training"]
        assert loop["teacher"] is previous and not previous.training
        assert all(torch.equal(v, previous.net.state_dict()[k]) for k, v in loop["states"]["net"].items())
        args_seen = seen.pop(0)
        assert args_seen[4] == N and args_seen[6:] == (tau, beta, gamma, True)
        loaded = args_seen[5]
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert (loop["settings"]["tau"], loop["settings"]["beta"], loop["settings"]["gamma"]) == (tau, beta, gamma)
        previous = loop["student"]
    (rep,) = spy.reports
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert rep["training"][id(previous.net)] is False
    assert torch.equal(rep["sample_fn"](eps), pd.sample_ddim(previous, eps, 1))


def test_cfd_stages_and_their_refusals():
    """PD down to --cfd-from (a power of two, at most --start-steps; equal: no PD stage), then CFD down to --nfe (a
    power of two below --cfd-from); each refusal names its own flag."""
    lab = lambda *a: cfd.parse_args(["--preset", "lab", *a])
    assert cfd.cfd_stages(lab("--nfe", "4")) == ([16, 8], [4])
    assert cfd.cfd_stages(lab("--nfe", "2", "--cfd-from", "32")) == ([], [16, 8, 4, 2])
    for argv, message in ((["--cfd-from", "64"], "--cfd-from 64"), (["--cfd-from", "12"], "--cfd-from 12"),
                          (["--nfe", "8"], "--nfe 8: CFD halves"), (["--nfe", "16"], "--nfe 16: CFD halves"),
                          (["--nfe", "3"], "--nfe 3: CFD halves")):
        with pytest.raises(common.UserError, match=message):
            cfd.cfd_stages(lab(*argv))
