"""Tests of pd.py: Progressive Distillation's target, loss weight and sampler against independent
computations (an analytic Gaussian teacher, EDM-space Euler = DDIM), and the CLI: --nfe validation,
end-to-end smoke run, resume at the right stage and refusal of another chain, torchrun with two processes."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import common
import pd
from conftest import MainSpy, check_run_pictures, gaussian_denoiser, run_script

torch.set_num_threads(2)
MU, VAR = 0.3, 0.2 ** 2          # data ~ N(MU, VAR) per pixel: the exact denoiser is known


def cosine(t):
    """The cosine schedule written out independently: (alpha_t, sigma_t, EDM sigma = sigma_t/alpha_t)."""
    b = math.atan(math.exp(-20 / 2))               # lambda_max = 20
    a = math.atan(80.0) - b                           # lambda_min = -2 ln 80: EDM sigma 80 at t = 1
    logsnr = -2 * math.log(math.tan(a * t + b))
    alpha, sigma = math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))
    return alpha, sigma, math.exp(-logsnr / 2)


def batch(i_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(i_values)
    x = (torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1)
    eps = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return x, eps, torch.tensor(i_values)


# --- The method's equations -------------------------------------------------------------------

def test_schedule_ends_at_the_teachers_sigma_max():
    """t = 1 is EDM sigma 80 (the shared teacher's sigma_max), not the authors' 2.2e4; sigma grows with t."""
    t = torch.tensor([1.0, 0.5, 0.25, 1 / 32], dtype=torch.float64)
    alpha, sigma = pd.alpha_sigma(t, torch.zeros(1, dtype=torch.float64))
    edm = (sigma / alpha).flatten()
    assert edm[0].item() == pytest.approx(80.0, rel=1e-6)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha)) and (edm[:-1] > edm[1:]).all()
    assert edm.tolist() == pytest.approx([cosine(tk)[2] for tk in t.tolist()], rel=1e-6)


@pytest.mark.parametrize("N", [2, 4, 16])
def test_target_makes_one_student_step_land_on_two_teacher_steps(N):
    D = gaussian_denoiser(MU, VAR)
    i_values = list(range(1, N))                                   # i = 0 is tested separately
    x, eps, i = batch(i_values)
    t = (i.double() + 1) / N
    z_t = torch.stack([cosine(tk)[0] * x[k] + cosine(tk)[1] * eps[k] for k, tk in enumerate(t.tolist())])
    x_tilde, z_pp = pd.teacher_target(D, z_t, t, N)
    for k, tk in enumerate(t.tolist()):
        a_t, s_t, sig_t = cosine(tk)
        _, _, sig_p = cosine(tk - 0.5 / N)
        a_pp, s_pp, sig_pp = cosine(tk - 1 / N)
        # The teacher's two DDIM steps are two Euler steps in x = z/alpha, sigma = s/alpha (EDM, arXiv:2206.00364 Sec. 2).
        x_pp = common.sample_euler(D, z_t[k:k + 1] / a_t, [sig_t, sig_p, sig_pp])
        assert torch.allclose(z_pp[k:k + 1], a_pp * x_pp, rtol=1e-5, atol=1e-6)
        # One student DDIM step t -> t'' with x_hat = x~ lands exactly on the teacher's z_t''.
        z_student = a_pp * x_tilde[k] + s_pp / s_t * (z_t[k] - a_t * x_tilde[k])
        assert torch.allclose(z_student, a_pp * x_pp[0], rtol=1e-5, atol=1e-6)
        # ... and a target built with t' in place of t'' (the common bug) does not.
        a_p, s_p, _ = cosine(tk - 0.5 / N)
        swapped = (a_pp * x_pp[0] - s_p / s_t * z_t[k]) / (a_p - s_p / s_t * a_t)
        assert not torch.allclose(swapped, x_tilde[k], atol=1e-3)


def test_target_at_i0_is_the_teachers_last_x_hat():
    D, N = gaussian_denoiser(MU, VAR), 4
    x, eps, i = batch([0, 0, 1])
    t = (i.double() + 1) / N
    z_t = torch.stack([cosine(tk)[0] * x[k] + cosine(tk)[1] * eps[k] for k, tk in enumerate(t.tolist())])
    x_tilde, _ = pd.teacher_target(D, z_t, t, N)
    a_t, _, sig_t = cosine(1 / N)
    _, _, sig_p = cosine(0.5 / N)
    x_p = common.sample_euler(D, z_t[:2] / a_t, [sig_t, sig_p])          # the teacher's state at t' = 0.5/N
    assert torch.allclose(x_tilde[:2], D(x_p, sig_p), rtol=1e-5, atol=1e-6)
    # i = 1 uses the closed form, not its own teacher's last x_hat (at t' = 1.5/N, from the same sample).
    a_2, _, sig_2 = cosine(2 / N)
    _, _, sig_2p = cosine(1.5 / N)
    x_2p = common.sample_euler(D, z_t[2:] / a_2, [sig_2, sig_2p])
    assert not torch.allclose(x_tilde[2:], D(x_2p, sig_2p), atol=1e-3)


def test_loss_is_truncated_snr_weighted_x_error():
    """Alg. 2 for one batch: the flips (if any), then eps, then i ~ U{0..N-1} drawn from gen, in that order, and
    the mean over the batch of max(SNR_t, 1)*|x_hat_student(z_t) - x~|^2 at t = (i+1)/N."""
    N, B = 8, 48
    teacher, student = gaussian_denoiser(MU, VAR), gaussian_denoiser(mu=-0.1, var=0.3)
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    losses = {}
    for xflip in (False, True):
        loss = pd.pd_loss(student, teacher, x, torch.Generator().manual_seed(7), N, xflip)
        losses[xflip] = loss.item()
        g = torch.Generator().manual_seed(7)                   # the same draws, by hand
        xs = pd.random_xflip(x, g) if xflip else x
        eps, i = torch.randn(x.shape, generator=g), torch.randint(N, (B,), generator=g)
        assert 0 in i.tolist() and N - 1 in i.tolist()        # SNR > 1 for t < 1/2, < 1 above: both branches of max
        expected, weights = [], []
        for k, ik in enumerate(i.tolist()):
            tk = (ik + 1) / N
            a_t, s_t, sig_t = cosine(tk)
            z_t = a_t * xs[k:k + 1] + s_t * eps[k:k + 1]
            _, _, sig_p = cosine(tk - 0.5 / N)
            a_pp, s_pp, sig_pp = cosine(tk - 1 / N)
            x_state = z_t / a_t
            if ik == 0:
                target = teacher(common.sample_euler(teacher, x_state, [sig_t, sig_p]), sig_p)
            else:
                z_pp = a_pp * common.sample_euler(teacher, x_state, [sig_t, sig_p, sig_pp])
                target = (z_pp - s_pp / s_t * z_t) / (a_pp - s_pp / s_t * a_t)
            w = max(a_t**2 / s_t**2, 1.0)
            weights.append(w)
            expected.append(w * ((student(x_state, sig_t) - target) ** 2).mean().item())
        assert min(weights) == 1.0 and max(weights) > 10
        assert loss.item() == pytest.approx(sum(expected) / B, rel=1e-5)
    assert not torch.equal(pd.random_xflip(x, torch.Generator().manual_seed(7)), x)   # the flips did something
    default = pd.pd_loss(student, teacher, x, torch.Generator().manual_seed(7), N).item()    # no flips unless asked
    assert default == losses[False] != losses[True]
    # The weight function itself: max(SNR, 1) at SNR = 4 and SNR = 1/4.
    a, s = torch.tensor([2.0, 1.0]) / math.sqrt(5), torch.tensor([1.0, 2.0]) / math.sqrt(5)
    assert torch.allclose(pd.truncated_snr_weight(a, s), torch.tensor([4.0, 1.0]))


def test_ddim_sampler_is_euler_on_the_cosine_grid_and_clips():
    D, N = gaussian_denoiser(MU, VAR), 4
    eps = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sig = [cosine(k / N)[2] for k in range(N, 0, -1)]                   # sigma at t = 1, 3/4, ..., 1/N
    x_last = common.sample_euler(D, eps / cosine(1.0)[0], sig)          # z_1 = eps, x = z/alpha
    assert torch.allclose(pd.sample_ddim(D, eps, N, clip=False), D(x_last, sig[-1]), rtol=1e-5, atol=1e-6)
    wide = gaussian_denoiser(mu=0.0, var=4.0)                           # x_hat often outside [-1, 1]
    out = pd.sample_ddim(wide, eps, N)
    assert out.abs().max() <= 1 and out.abs().max() == 1


def test_ddim_clips_x_hat_at_every_step():
    """x_hat is clipped at every DDIM step (the authors' _run_model), not only at the last one: the states
    the network sees after the first clipped step are those of the clipped recursion."""
    wide, N = gaussian_denoiser(mu=0.0, var=4.0), 4                     # x_hat often outside [-1, 1]
    eps = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def ddim_by_hand(clip_every):
        z, inputs = eps, []
        for k in range(N, 0, -1):
            a_t, s_t, sig_t = cosine(k / N)
            inputs.append(z / a_t)
            x_hat = wide(z / a_t, sig_t)
            if clip_every or k == 1:
                x_hat = x_hat.clamp(-1, 1)
            if k == 1:
                return x_hat, inputs
            a_s, s_s, _ = cosine((k - 1) / N)
            z = a_s * x_hat + s_s / s_t * (z - a_t * x_hat)

    seen = []
    recorder = lambda x, sigma, cond=None: (seen.append(x.clone()), wide(x, sigma))[1]
    out = pd.sample_ddim(recorder, eps, N)
    x_hat, inputs = ddim_by_hand(True)
    assert torch.allclose(out, x_hat, rtol=1e-5, atol=1e-6)
    assert len(seen) == N and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(seen, inputs))
    _, unclipped = ddim_by_hand(False)
    assert not torch.allclose(seen[-1], unclipped[-1], atol=1e-3)


def test_student_is_a_dropout_free_trainable_copy_of_its_teacher():
    """theta <- eta (Alg. 2), dropout 0 as the authors' distillation config: the student computes the teacher's
    function even in train mode, and its own parameters train."""
    torch.manual_seed(0)
    net = common.build_net(dict(in_ch=1, res=32, **dict(common.NET_CONFIGS["smoke"], dropout=0.5)))
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    teacher = common.Denoiser(net).eval().requires_grad_(False)
    student = pd.make_student(teacher).train()
    dropouts = [m for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts) and all(p.requires_grad for p in student.parameters())
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(student(x, 2.0), teacher(x, 2.0)) and student.net is not teacher.net


def test_random_xflip_flips_the_drawn_half():
    x = torch.arange(6 * 2 * 3, dtype=torch.float32).reshape(6, 1, 2, 3)
    out = pd.random_xflip(x, torch.Generator().manual_seed(1))
    flip = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < flip.sum() < 6
    assert torch.equal(out[flip], x[flip].flip(-1)) and torch.equal(out[~flip], x[~flip])


def test_chain_teachers_students_lr_and_flips(tmp_path, monkeypatch):
    """Alg. 2's outer loop (pd.distil), watched from inside: stage 8 -> 4 distils the original teacher, stage 4 -> 2
    the finished 4-step student (eta <- theta), each student starts as an exact copy of its teacher, the lr is
    annealed linearly to 0 over each stage (the authors' config), and the loss gets the drawn images and --xflip."""
    args = pd.parse_args(["--preset", "smoke", "--nfe", "2", "--out", str(tmp_path / "spy")])
    pg = common.Dist("cpu")
    data = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)                                     # a tiny teacher: the loop is under test, not the net
    net = common.build_net(dict(in_ch=1, res=16, ch=8, mults=(1,), blocks=1, attn_res=(), heads=1, dropout=0.0))
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    teacher = common.Denoiser(net).eval().requires_grad_(False)
    weights_of = lambda D: {k: v.clone() for k, v in D.net.state_dict().items()}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    seen, lrs, real_loss = [], [], pd.pd_loss

    def spy_loss(student, teacher_, x, gen, N, xflip):
        seen.append(dict(N=N, teacher=weights_of(teacher_), student=weights_of(student), x=x.clone(), xflip=xflip))
        return real_loss(student, teacher_, x, gen, N, xflip)

    real_step = torch.optim.Adam.step

    def spy_step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy_step)
    monkeypatch.setattr(pd, "pd_loss", spy_loss)
    out = tmp_path / "spy"
    student, _, run = pd.distil(args, pg, data, teacher, [4, 2], out, dict(start_steps=8), torch.Generator().manual_seed(0))
    iters = args.iters
    assert [s["N"] for s in seen] == [4] * iters + [2] * iters and all(s["xflip"] for s in seen)
    assert run["images"] == 2 * iters * args.batch
    original = weights_of(teacher)
    first4 = common.load_checkpoint(pd.stage_path(out, 4), "pd-student")["net"]
    assert all(same(s["teacher"], original) for s in seen[:iters])                  # stage 1: the original teacher
    assert all(same(s["teacher"], first4) for s in seen[iters:])                     # stage 2: the 4-step student
    assert not same(first4, original) and same(weights_of(student), common.load_checkpoint(out / "student-2steps.pt")["net"])
    for stage in (seen[0], seen[iters]):                                             # theta <- eta, exactly
        assert same(stage["student"], stage["teacher"])
    expected = [args.lr * (1 - k / iters) for k in range(iters)] * 2                 # linear anneal to 0, per stage
    assert lrs == pytest.approx(expected, rel=1e-12)
    gen = torch.Generator().manual_seed(0)                                           # the first update's images
    assert torch.equal(seen[0]["x"], common.to_float(common.random_batch(data, args.batch, gen)))


def test_stages_and_nfe_validation():
    assert pd.stage_steps(4, 32) == [16, 8, 4]
    assert pd.stage_steps(1, 8) == [4, 2, 1]
    assert pd.stage_steps(8, 8) == []
    for nfe, start in [(3, 32), (64, 32), (0, 32), (4, 24)]:
        with pytest.raises(common.UserError):
            pd.stage_steps(nfe, start)


def test_bad_nfe_is_one_line(tmp_path):
    r = run_script("pd.py", "--preset", "smoke", "--nfe", "3", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "power of two" in r.stderr


def test_nfe_above_start_steps_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        common.main_guard(lambda: pd.main(["--preset", "smoke", "--nfe", "16"]))   # smoke starts at 8 steps
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "no larger than 8" in err


# --- End to end -------------------------------------------------------------------------------

def smoke_args(fashion_dir, smoke_teacher, out, *extra):
    return ["--preset", "smoke", "--data-dir", str(fashion_dir), "--teacher", str(smoke_teacher),
            "--out", str(out), *map(str, extra)]


def weights(path):
    return common.load_checkpoint(path, "pd-student")["net"]


def test_smoke_run_writes_outputs_and_resumes_at_the_right_stage(fashion_dir, smoke_teacher, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Straight run 8 -> 4 -> 2 steps.
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 2))
    a = tmp_path / "a"
    m = json.loads((a / "nfe2" / "metrics.json").read_text())
    assert m["method"] == "pd" and m["nfe"] == 2 and m["stages"] == [4, 2] and (a / "nfe2" / "samples.png").exists()
    assert m["images_seen"] == 2 * 3 * 8 and m["xflip"] is True
    rows = check_run_pictures(a / "nfe2", ["pd 8 -> 4 steps", "pd 4 -> 2 steps"])
    assert int(rows[-1][1]) == m["images_seen"]                   # the chain's images, counted on over its stages
    # The stage files are what cfd.py reuses: finished, with their settings; the student differs from the teacher.
    ck = common.load_checkpoint(a / "student-4steps.pt", "pd-student")
    assert ck["finished"] and ck["step"] == 3 and ck["settings"]["start_steps"] == 8 and ck["settings"]["iters"] == 3
    assert common.load_checkpoint(a / "student-2steps.pt", "pd-student")["finished"]

    # A 4-step run, then --nfe 2 --resume: only the 4 -> 2 stage trains, and ends where the straight run did.
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "b", "--nfe", 4))
    capsys.readouterr()
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "b", "--nfe", 2, "--resume"))
    log = capsys.readouterr()
    assert "resuming pd 8 -> 4 steps at 3 of 3 updates" in log.out + log.err
    b4, b2 = (json.loads((tmp_path / "b" / f"nfe{n}" / "metrics.json").read_text()) for n in (4, 2))
    assert (b4["nfe"], b2["nfe"]) == (4, 2), "the 2-step evaluation must not overwrite the 4-step one"
    assert b2["images_seen"] == m["images_seen"]
    wa, wb = weights(a / "student-2steps.pt"), weights(tmp_path / "b" / "student-2steps.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "a resumed chain must equal an uninterrupted one"

    # Interrupted in the middle of the 4 -> 2 stage (right after its first checkpoint): --resume
    # continues that stage at that update and ends where the straight run did.
    real_save = common.save_checkpoint

    def save_then_stop(path, kind, **payload):
        real_save(path, kind, **payload)
        if path.name == "student-2steps.pt" and not payload["finished"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "c", "--nfe", 2))
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    c = tmp_path / "c"
    assert common.load_checkpoint(c / "student-4steps.pt")["finished"]
    ck = common.load_checkpoint(c / "student-2steps.pt")
    assert ck["step"] == 2 and not ck["finished"]
    capsys.readouterr()
    pd.main(smoke_args(fashion_dir, smoke_teacher, c, "--nfe", 2, "--resume"))
    log = capsys.readouterr()
    assert "resuming pd 4 -> 2 steps at 2 of 3 updates" in log.out + log.err
    wc = weights(c / "student-2steps.pt")
    assert all(torch.equal(wa[k], wc[k]) for k in wa), "a resumed stage must equal an uninterrupted one"
    assert json.loads((c / "nfe2" / "metrics.json").read_text())["images_seen"] == m["images_seen"]


def test_torchrun_two_processes(fashion_dir, smoke_teacher, tmp_path):
    r = run_script("pd.py", *smoke_args(fashion_dir, smoke_teacher, tmp_path / "ddp", "--nfe", 4),
                   cwd=tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout + r.stderr
    m = json.loads((tmp_path / "ddp" / "nfe4" / "metrics.json").read_text())
    assert m["nfe"] == 4 and m["images_seen"] == 3 * 8 and (tmp_path / "ddp" / "student-4steps.pt").exists()


def test_resume_refuses_a_chain_trained_with_another_budget(fashion_dir, smoke_teacher, tmp_path, monkeypatch, capsys):
    """A finished stage is reused only with the updates, lr and batch it was trained with, and from the same chain."""
    monkeypatch.chdir(tmp_path)
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 4))
    with pytest.raises(common.UserError, match="iters 3 .now 5."):
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 2, "--resume", "--iters", 5))
    with pytest.raises(common.UserError, match="lr 0.0001 .now 0.001."):
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 2, "--resume", "--lr", 1e-3))
    with pytest.raises(common.UserError, match="start_steps 8 .now 16."):           # trains 16 -> 8, then refuses 8 -> 4
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 4, "--resume", "--start-steps", 16))


# --- The paper preset and what main builds ------------------------------------------------------

# (key, value, source: google-research diffusion_distillation/config/cifar_distill.py, and the paper's Sec. 4)
PAPER = [("start_steps", 8192, "start_num_steps = 8192"), ("iters", 50_000, "distill_steps_per_iter = 50000"),
         ("batch", 128, "train.batch_size"), ("lr", 5e-5, "train.learning_rate, linear anneal"),
         ("grad_clip", 1.0, "train.grad_clip"), ("xflip", True, "dataset.args.randflip"),
         ("later_factor", 2.0, "Sec. 4: the 2- and 1-step stages gain from twice the updates"), ("later_steps", 2, "idem")]


@pytest.mark.parametrize("key,value,source", PAPER)
def test_paper_preset_values(key, value, source):
    assert getattr(pd.parse_args(["--preset", "paper"]), key) == value, source


def test_main_builds_each_stage_and_samples_the_last_student(fashion_dir, random_teacher, tmp_path, monkeypatch):
    """What pd.main hands each stage's loop and the report (MainSpy): a fresh Adam at --lr per stage, annealed linearly
    to 0, clip 1; each student a dropout-free copy of its teacher (the previous student, frozen, eval mode) in train
    mode; pd_loss with the stage's N and the flips; the report samples the last student, in eval mode, with clipped
    DDIM over --nfe steps."""
    monkeypatch.chdir(tmp_path)
    spy, real, seen = MainSpy(monkeypatch), pd.pd_loss, []

    def probe(loop):                                          # the loss this stage's loop gets, called while it runs
        pd.pd_loss = lambda *a: seen.append(a) or torch.zeros(())
        try:
            loop["loss"](loop["student"], loop["teacher"], torch.rand(2, 1, 32, 32) * 2 - 1, torch.Generator())
        finally:
            pd.pd_loss = real
    spy.probe = probe
    pd.main(["--preset", "smoke", "--nfe", "2", "--data-dir", str(fashion_dir), "--teacher", str(random_teacher),
             "--out", str(tmp_path / "run")])
    assert len(spy.loops) == 2 and len(spy.reports) == 1
    previous = spy.loops[0]["teacher"]
    assert previous.source == str(random_teacher)                  # the loaded teacher file teaches the first stage
    for loop, N in zip(spy.loops, (4, 2)):
        opt, student, b = loop["opt"], loop["student"], loop["budget"]
        group = opt.param_groups[0]
        assert type(opt) is torch.optim.Adam and (group["lr"], group["betas"], group["eps"]) == (1e-4, (0.9, 0.999), 1e-8)
        assert (b.total, b.unit, b.batch, b.lr, b.clip) == (3, "updates", 8, 1e-4, 1.0)
        assert [b.schedule(1.0, d, 4) for d in (0, 1, 3)] == pytest.approx([1.0, 0.75, 0.25])
        assert loop["teacher"] is previous and not previous.training and loop["student_training"]
        assert all(torch.equal(v, previous.net.state_dict()[k]) for k, v in loop["states"]["net"].items())
        assert all(m.p == 0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
        assert loop["path"].name == f"student-{N}steps.pt" and loop["settings"]["xflip"] is True
        assert seen.pop(0)[4:] == (N, True)                      # pd_loss with the stage's N and the flips
        previous = student
    (rep,) = spy.reports
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert rep["training"][id(previous.net)] is False
    assert torch.equal(rep["sample_fn"](eps), pd.sample_ddim(previous, eps, 2, clip=True))
    assert not torch.allclose(rep["sample_fn"](eps), pd.sample_ddim(spy.loops[0]["student"], eps, 2), atol=1e-4)


def test_stage_budget_scales_the_later_stages():
    """--iters updates a stage, times --later-factor for the stages ending at N <= --later-steps; batch, lr, clip and
    checkpoints as given."""
    args = SimpleNamespace(iters=100, later_factor=0.5, later_steps=4, batch=8, lr=1e-3, ckpt_every=20, grad_clip=1.0)
    budgets = {N: pd.stage_budget(args, N, common.constant_lr) for N in (16, 8, 4, 2)}
    assert [b.total for b in budgets.values()] == [100, 100, 50, 50]
    b = budgets[4]
    assert (b.unit, b.batch, b.lr, b.ckpt_every, b.clip, b.schedule) == ("updates", 8, 1e-3, 20, 1.0, common.constant_lr)
