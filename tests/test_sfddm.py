"""Tests of sfddm.py: the student's chain (Eq. 8-10, Sec. 3.6/4.2), the loss of Alg. 1 with its
hidden-variable term, the two samplers, and the command line."""
import json
import math

import numpy as np
import pytest
import torch

import common
import sfddm
from conftest import run_script

torch.set_num_threads(2)


# --- the sub-sequence phi (Sec. 3.2, 3.6, 4.2) ----------------------------------------------

def test_subsequence_divisible_is_c_times_t():
    assert sfddm.subsequence(1024, 4) == [0, 256, 512, 768, 1024]
    assert sfddm.subsequence(1024, 16) == [64 * t for t in range(17)]
    assert sfddm.subsequence(10, 10) == list(range(11))


@pytest.mark.parametrize("T, T_s", [(1000, 3), (1000, 7), (1024, 10), (1024, 100), (9, 4)])
def test_subsequence_non_divisible_is_rounded_linspace(T, T_s):
    expected = np.floor(np.linspace(0, T, T_s + 1) + 0.5).astype(int).tolist()    # round half up
    phi = sfddm.subsequence(T, T_s)
    assert phi == expected and phi[0] == 0 and phi[-1] == T
    assert all(b > a for a, b in zip(phi, phi[1:]))
    assert sfddm.subsequence(1000, 3) == [0, 333, 667, 1000]


@pytest.mark.parametrize("p", [0.2, 0.4, 1.0])
def test_concentrated_subsequence(p):
    T, T_s = 1024, 16
    phi = sfddm.subsequence(T, T_s, "concentrated", p)
    assert len(phi) == T_s + 1 and phi[0] == 0 and phi[-1] == T
    assert all(b > a for a, b in zip(phi, phi[1:]))
    lo, hi = T / 2 - 0.05 * T / 2, T / 2 + 0.05 * T / 2
    inside = [u for u in phi[1:-1] if lo <= u <= hi]
    assert len(inside) == round(p * (T_s - 1))


def test_subsequence_rejects_impossible_lengths():
    for T, T_s in [(1024, 1), (1024, 0), (16, 17)]:
        with pytest.raises(common.UserError):
            sfddm.subsequence(T, T_s)
    with pytest.raises(common.UserError):           # 15 points cannot fit into a 5% window of T = 64
        sfddm.subsequence(64, 16, "concentrated", 1.0)


# --- Eq. 8 -> Eq. 9: the student's marginal is the teacher's at phi_t -------------------------

@pytest.mark.parametrize("phi", [[0, 256, 512, 768, 1024], [0, 333, 667, 1000],
                                 sfddm.subsequence(1024, 16, "concentrated", 0.4)])
def test_student_marginal_equals_teacher_marginal_at_phi(phi):
    T = phi[-1]
    alpha_bar = sfddm.teacher_alpha_bar(T)
    a_s = sfddm.student_alpha_bar(alpha_bar, phi)
    # The teacher's q(x_k | x_0) composed from its own per-step transitions (Eq. 2), betas from scratch.
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    mean_T, var_T = [1.0], [0.0]
    for beta in betas.tolist():
        mean_T.append(mean_T[-1] * math.sqrt(1 - beta))
        var_T.append((1 - beta) * var_T[-1] + beta)
    # The student's q'(x'_t | x'_0) composed from its Eq. 8 transitions.
    mean_S, var_S = 1.0, 0.0
    for t in range(1, len(phi)):
        coef, var = (float(v) for v in sfddm.forward_step(a_s, t))
        mean_S, var_S = coef * mean_S, coef**2 * var_S + var
        assert math.isclose(mean_S, mean_T[phi[t]], rel_tol=1e-9)                    # Eq. 9 = Eq. 3 at phi_t
        assert math.isclose(var_S, var_T[phi[t]], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(mean_S, math.sqrt(float(a_s[t])), rel_tol=1e-9)
        assert math.isclose(var_S, 1 - float(a_s[t]), rel_tol=1e-9)


def test_student_marginal_by_sampling_the_chain():
    phi = [0, 256, 512, 768, 1024]
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), phi)
    g = torch.Generator().manual_seed(0)
    x0 = 0.7
    x = torch.full((200_000,), x0, dtype=torch.float64)
    for t in range(1, 5):
        coef, var = sfddm.forward_step(a_s, t)
        x = coef * x + var.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        assert abs(x.mean().item() - math.sqrt(a_s[t]) * x0) < 0.01
        assert abs(x.var().item() - (1 - a_s[t].item())) < 0.01


# --- Eq. 10: the posterior against direct Gaussian conditioning ------------------------------

@pytest.mark.parametrize("phi", [[0, 256, 512, 768, 1024], [0, 333, 667, 1000], [0, 1, 2, 900, 1000]])
def test_posterior_matches_gaussian_conditioning(phi):
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(phi[-1]), phi)
    for t in range(1, len(phi)):
        a_t, a_prev = a_s[t].item(), a_s[t - 1].item()
        # Joint of (x'_{t-1}, x'_t) given x'_0: x'_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev) (Eq. 9),
        # x'_t = r x'_{t-1} + N(0, 1 - r^2), r = sqrt(a_t/a_prev) (Eq. 8). Condition on x'_t (Schur complement).
        r = math.sqrt(a_t / a_prev)
        cov = r * (1 - a_prev)                      # Cov(x'_{t-1}, x'_t)
        gain = cov / (1 - a_t)                      # = coefficient of x'_t
        coef_x0_direct = math.sqrt(a_prev) - gain * math.sqrt(a_t)
        var_direct = (1 - a_prev) - cov**2 / (1 - a_t)
        coef_xt, coef_x0, var = (v.item() for v in sfddm.posterior(a_s, t))
        assert math.isclose(coef_xt, gain, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(coef_x0, coef_x0_direct, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(var, var_direct, rel_tol=1e-7, abs_tol=1e-12)
    # At t = 1 (alpha_bar'_0 = 1) the posterior is the point x'_0 itself.
    assert [v.item() for v in sfddm.posterior(a_s, 1)] == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)


# --- The two samplers against common.py's independent ones ----------------------------------

def small_denoiser(seed=0):
    torch.manual_seed(seed)
    net = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"])
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)            # non-trivial output
    return common.Denoiser(net.eval())


def phi_sigmas(a_s):
    """The student's levels as a decreasing sigma list ending in 0 (common's sampler convention)."""
    return common.append_zero(common.sigma_from_alpha_bar(a_s[1:]).flip(0))


def test_ddim_is_euler_over_the_student_sigmas():
    D = small_denoiser()
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), [0, 256, 512, 768, 1024])
    z = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = sfddm.sample_ddim(D, z, a_s, clip=False)
    euler = common.sample_euler(D, z / a_s[-1].sqrt().item(), phi_sigmas(a_s))     # x = z/alpha
    assert torch.allclose(ours, euler, atol=1e-4)


def test_ancestral_is_the_posterior_chain_of_ddpm():
    D = small_denoiser()
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1000), [0, 333, 667, 1000])
    z = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    noises = [torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(10 + k)) for k in range(2)]
    it = iter(noises)
    ours = sfddm.sample_ancestral(D, z, a_s, noise=lambda x: next(it), clip=False)
    it = iter(noises)
    ref = common.sample_ddpm(D, z / a_s[-1].sqrt().item(), phi_sigmas(a_s), noise=lambda x: next(it))
    assert torch.allclose(ours, ref, atol=1e-4)
    assert not torch.allclose(ours, sfddm.sample_ddim(D, z, a_s, clip=False), atol=1e-2)


# --- Alg. 1: the loss, its hidden-variable term, and its optimum -------------------------------

def test_loss_terms_and_features_before_the_output_conv():
    teacher = small_denoiser(0).requires_grad_(False)
    student = common.Denoiser(common.student_from(teacher.net))
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), [0, 256, 512, 768, 1024])
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1, torch.randn(4, 1, 32, 32, generator=g)
    t = torch.tensor([1, 2, 3, 4])
    # The teacher is SFDDM's optimum: a student copied from it has exactly zero loss.
    loss, loss_eps, loss_h = sfddm.sfddm_loss(teacher, student, x0, t, eps, a_s)
    assert loss.item() == 0 and loss_eps.item() == 0 and loss_h.item() == 0
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    seen = {}
    hooks = [net.conv_out.register_forward_pre_hook(lambda m, inp, k=k: seen.__setitem__(k, inp[0].detach()))
             for k, net in (("teacher", teacher.net), ("student", student.net))]
    loss, loss_eps, loss_h = sfddm.sfddm_loss(teacher, student, x0, t, eps, a_s, hidden_weight=0.5)
    for h in hooks:
        h.remove()
    # The hidden term is the L1 between the maps that enter the output conv.
    assert seen["teacher"].shape[1] == teacher.net.conv_out.in_channels
    assert torch.allclose(loss_h, (seen["teacher"] - seen["student"]).abs().mean(), rtol=1e-6)
    assert torch.allclose(loss, loss_eps + 0.5 * loss_h)
    # The eps term, from scratch: one input x = sqrt(a) x0 + sqrt(1-a) eps, eps_hat = (x - sqrt(a) D)/sqrt(1-a).
    a = a_s[t].float().view(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    sigma = ((1 - a) / a).sqrt()
    with torch.no_grad():
        e_t = (x - a.sqrt() * teacher(x / a.sqrt(), sigma.flatten())) / (1 - a).sqrt()
        e_s = (x - a.sqrt() * student(x / a.sqrt(), sigma.flatten())) / (1 - a).sqrt()
    assert torch.allclose(loss_eps, (e_t - e_s).abs().mean(), rtol=1e-4)
    # Gradients reach the student only; hidden_weight 0 drops the term.
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.net.conv_in.weight.grad.abs().sum() > 0
    loss0, _, loss_h0 = sfddm.sfddm_loss(teacher, student, x0, t, eps, a_s, hidden_weight=0)
    assert loss_h0.item() == 0 and torch.allclose(loss0, loss_eps)


# --- command line ---------------------------------------------------------------------------

def cli(tmp_path, fashion_dir, smoke_teacher, out, *extra, torchrun=0):
    return run_script("sfddm.py", "--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher,
                      "--out", tmp_path / out, *extra, cwd=tmp_path, torchrun=torchrun)


@pytest.mark.parametrize("nfe, msg", [(1, "T' >= 2"), (2048, "T = 1024")])
def test_bad_nfe_is_one_line(tmp_path, fashion_dir, smoke_teacher, nfe, msg):
    r = cli(tmp_path, fashion_dir, smoke_teacher, "bad", "--nfe", nfe)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr


def test_smoke_end_to_end_and_resume_continue_exactly(tmp_path, fashion_dir, smoke_teacher):
    r = cli(tmp_path, fashion_dir, smoke_teacher, "full", "--init", "fresh", "--images", 64)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    for key in ("method", "variant", "dataset", "preset", "nfe", "fid", "fid_n", "teacher_fid_dpm3m",
                "teacher_fid_euler", "train_seconds", "images_seen", "teacher_rms", "teacher_rms_dpm3m",
                "teacher_rms_euler", "fid_ancestral", "teacher_rms_ancestral"):
        assert key in m, key
    assert m["method"] == "sfddm" and m["nfe"] == 4 and m["images_seen"] == 64 and m["phi"] == [0, 256, 512, 768, 1024]
    assert m["teacher_rms"] > 0 and m["teacher_rms_ancestral"] > 0
    for f in ("samples.png", "samples_ancestral.png", "student.pt", "checkpoint.pt"):
        assert (tmp_path / "full" / f).exists(), f
    assert "student" in r.stdout.strip().splitlines()[-1] and "teacher_rms" in r.stdout.strip().splitlines()[-1]
    # Stopped at 32 images and resumed to 64: the same weights as the uninterrupted run.
    r = cli(tmp_path, fashion_dir, smoke_teacher, "split", "--init", "fresh", "--images", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(tmp_path, fashion_dir, smoke_teacher, "split", "--init", "fresh", "--images", 64, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming SFDDM training at 32 images" in r.stdout + r.stderr
    full = common.load_checkpoint(tmp_path / "full" / "student.pt", "sfddm-student")
    split = common.load_checkpoint(tmp_path / "split" / "student.pt", "sfddm-student")
    assert split["images_seen"] == 64
    for k, v in full["ema"].items():
        assert torch.allclose(v, split["ema"][k], atol=1e-6), k


def test_torchrun_two_processes(tmp_path, fashion_dir, smoke_teacher):
    r = cli(tmp_path, fashion_dir, smoke_teacher, "ddp", "--init", "fresh", "--sampler", "ancestral",
            "--subseq", "concentrated", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout + r.stderr
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["variant"] == "sfddm-ancestral-fresh" and "teacher_rms_ddim" in m and m["images_seen"] == 64
