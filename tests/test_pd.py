"""Tests of pd.py: Progressive Distillation's target, loss weight and sampler against independent
computations (an analytic Gaussian teacher, EDM-space Euler = DDIM), and the CLI: --nfe validation,
end-to-end smoke run, resume at the right stage, torchrun with two processes."""
import json
import math

import pytest
import torch

import common
import pd
from conftest import run_script

torch.set_num_threads(2)
MU, VAR = 0.3, 0.2 ** 2          # data ~ N(MU, VAR) per pixel: the exact denoiser is known


def gaussian_denoiser(mu=MU, var=VAR):
    """E[x0 | x0 + sigma*n] for x0 ~ N(mu, var): the exact D(x, sigma) of Gaussian data."""
    def D(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) else sigma
        return mu + var / (var + sigma**2) * (x - mu)
    return D


def cosine(t):
    """The cosine schedule written out independently: (alpha_t, sigma_t, EDM sigma = sigma_t/alpha_t)."""
    b = math.atan(math.exp(-20 / 2))
    a = math.atan(math.exp(20 / 2)) - b
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

@pytest.mark.parametrize("N", [2, 4, 16])
def test_target_makes_one_student_step_land_on_two_teacher_steps(N):
    D = gaussian_denoiser()
    i_values = list(range(1, N))                                   # i = 0 is tested separately
    x, eps, i = batch(i_values)
    t = (i.double() + 1) / N
    z_t = torch.stack([cosine(tk)[0] * x[k] + cosine(tk)[1] * eps[k] for k, tk in enumerate(t.tolist())])
    x_tilde, z_pp = pd.teacher_target(D, z_t, t, N)
    for k, tk in enumerate(t.tolist()):
        a_t, s_t, sig_t = cosine(tk)
        _, _, sig_p = cosine(tk - 0.5 / N)
        a_pp, s_pp, sig_pp = cosine(tk - 1 / N)
        # The teacher's two DDIM steps are two Euler steps in x = z/alpha, sigma = s/alpha (METHODS.md 0).
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
    D, N = gaussian_denoiser(), 4
    x, eps, i = batch([0, 0, 1])
    t = (i.double() + 1) / N
    z_t = torch.stack([cosine(tk)[0] * x[k] + cosine(tk)[1] * eps[k] for k, tk in enumerate(t.tolist())])
    x_tilde, _ = pd.teacher_target(D, z_t, t, N)
    a_t, _, sig_t = cosine(1 / N)
    _, _, sig_p = cosine(0.5 / N)
    x_p = common.sample_euler(D, z_t[:2] / a_t, [sig_t, sig_p])          # the teacher's state at t' = 0.5/N
    assert torch.allclose(x_tilde[:2], D(x_p, sig_p), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x_tilde[2], D(x_p, sig_p)[0], atol=1e-3)   # i = 1 uses the closed form


def test_loss_is_truncated_snr_weighted_x_error():
    N = 8
    teacher, student = gaussian_denoiser(), gaussian_denoiser(mu=-0.1, var=0.3)
    i_values = list(range(N))                     # SNR > 1 for t < 1/2, < 1 above: both branches of max
    x, eps, i = batch(i_values, seed=1)
    loss = pd.pd_loss(student, teacher, x, eps, i, N)
    expected, weights = [], []
    for k, ik in enumerate(i_values):
        tk = (ik + 1) / N
        a_t, s_t, sig_t = cosine(tk)
        z_t = a_t * x[k:k + 1] + s_t * eps[k:k + 1]
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
    assert loss.item() == pytest.approx(sum(expected) / N, rel=1e-5)
    # The weight function itself: max(SNR, 1) at SNR = 4 and SNR = 1/4.
    a, s = torch.tensor([2.0, 1.0]) / math.sqrt(5), torch.tensor([1.0, 2.0]) / math.sqrt(5)
    assert torch.allclose(pd.truncated_snr_weight(a, s), torch.tensor([4.0, 1.0]))


def test_ddim_sampler_is_euler_on_the_cosine_grid_and_clips():
    D, N = gaussian_denoiser(), 4
    eps = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sig = [cosine(k / N)[2] for k in range(N, 0, -1)]                   # sigma at t = 1, 3/4, ..., 1/N
    x_last = common.sample_euler(D, eps / cosine(1.0)[0], sig)          # z_1 = eps, x = z/alpha
    assert torch.allclose(pd.sample_ddim(D, eps, N, clip=False), D(x_last, sig[-1]), rtol=1e-5, atol=1e-6)
    wide = gaussian_denoiser(mu=0.0, var=4.0)                           # x_hat often outside [-1, 1]
    out = pd.sample_ddim(wide, eps, N)
    assert out.abs().max() <= 1 and out.abs().max() == 1


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
    assert m["images_seen"] == 2 * 3 * 8 and m["teacher_rms"] > 0
    assert (a / "student-4steps.pt").exists() and (a / "student-2steps.pt").exists()
    # The stage files are what cfd.py loads; the student differs from the teacher after training.
    args = pd.parse_args(["--preset", "smoke"])
    D4, path, ck = pd.load_pd_student(args, 4, a)
    assert ck["steps"] == 4 and not any(p.requires_grad for p in D4.parameters())
    with pytest.raises(common.UserError):
        pd.load_pd_student(args, 1, a)

    # A 4-step run, then --nfe 2 --resume: only the 4 -> 2 stage trains, and ends where the straight run did.
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "b", "--nfe", 4))
    capsys.readouterr()
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "b", "--nfe", 2, "--resume"))
    log = capsys.readouterr()
    assert "reusing the 4-step pd student" in log.out + log.err and "8->4" not in log.err
    b4, b2 = (json.loads((tmp_path / "b" / f"nfe{n}" / "metrics.json").read_text()) for n in (4, 2))
    assert (b4["nfe"], b2["nfe"]) == (4, 2), "the 2-step evaluation must not overwrite the 4-step one"
    wa, wb = weights(a / "student-2steps.pt"), weights(tmp_path / "b" / "student-2steps.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "a resumed chain must equal an uninterrupted one"

    # Interrupted in the middle of the 4 -> 2 stage (right after its first checkpoint): --resume
    # continues that stage at that update and ends where the straight run did.
    real_save = pd.save_checkpoint

    def save_then_stop(path, kind, **payload):
        real_save(path, kind, **payload)
        if kind == "pd-training" and payload["steps"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pd, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "c", "--nfe", 2))
    monkeypatch.setattr(pd, "save_checkpoint", real_save)
    c = tmp_path / "c"
    assert (c / "student-4steps.pt").exists() and not (c / "student-2steps.pt").exists()
    assert common.load_checkpoint(c / "checkpoint.pt")["iter"] == 2
    capsys.readouterr()
    pd.main(smoke_args(fashion_dir, smoke_teacher, c, "--nfe", 2, "--resume"))
    log = capsys.readouterr()
    assert "resuming the 4 -> 2 steps pd stage at update 2" in log.out + log.err
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


def test_check_chain_refuses_a_file_of_another_chain(tmp_path):
    chain = dict(start_steps=8, teacher="t.pt")
    pd.check_chain(dict(chain, steps=4), tmp_path / "s.pt", chain)               # same chain: accepted
    with pytest.raises(common.UserError, match="start_steps 16"):
        pd.check_chain(dict(chain, start_steps=16), tmp_path / "s.pt", chain)
    with pytest.raises(common.UserError, match="teacher"):
        pd.check_chain(dict(chain, teacher="other.pt"), tmp_path / "s.pt", chain)


def test_resume_refuses_a_chain_trained_with_another_budget(fashion_dir, smoke_teacher, tmp_path, monkeypatch, capsys):
    """A finished stage is reused only with the updates, lr and batch it was trained with."""
    monkeypatch.chdir(tmp_path)
    pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 4))
    with pytest.raises(common.UserError, match="iters 3 .now 5."):
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 2, "--resume", "--iters", 5))
    with pytest.raises(common.UserError, match="lr 0.0001 .now 0.001."):
        pd.main(smoke_args(fashion_dir, smoke_teacher, tmp_path / "a", "--nfe", 2, "--resume", "--lr", 1e-3))
