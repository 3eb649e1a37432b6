"""Tests of sfddm.py: the student's chain (Eq. 8-10, Sec. 3.6/4.2), the loss of Alg. 1 with its
hidden-variable term, the two samplers, and the command line."""
import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import fid
import sfddm
from conftest import MainSpy, run_script, sample_ddpm

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


def test_concentrated_subsequence_by_hand():
    """T = 1000, T' = 10, p = 0.2: the window [475, 525] holds n_in = round(0.2 * 9) = 2 points at its cells' centres
    487.5 and 512.5; the other 7 lie evenly over the 950 steps outside it, k * 950 / 8 = 118.75, 237.5, 356.25, 475,
    593.75, 712.5, 831.25, the ones from 475 on (the cut, [0, 475) being open) shifted past it by 50: 525, 643.75, ...
    Then round half up."""
    assert sfddm.subsequence(1000, 10, "concentrated", 0.2) == [0, 119, 238, 356, 488, 513, 525, 644, 763, 881, 1000]
    assert sfddm.subsequence(1000, 10, "concentrated") == sfddm.subsequence(1000, 10, "concentrated", 0.2)   # default p
    assert sfddm.subsequence(1000, 2) == [0, 500, 1000]                                                    # T' = 2 is allowed


def test_subsequence_rejects_impossible_lengths():
    for T, T_s in [(1024, 1), (1024, 0), (16, 17)]:
        with pytest.raises(common.UserError):
            sfddm.subsequence(T, T_s)
    with pytest.raises(common.UserError):           # 15 points cannot fit into a 5% window of T = 64
        sfddm.subsequence(64, 16, "concentrated", 1.0)
    with pytest.raises(common.UserError):           # T = 16: the one window point and the cut's both round to 8
        sfddm.subsequence(16, 3, "concentrated", 0.4)


# --- Eq. 9: the student's marginal is the teacher's at phi_t -----------------------------------

@pytest.mark.parametrize("phi", [[0, 256, 512, 768, 1024], [0, 333, 667, 1000],
                                 sfddm.subsequence(1024, 16, "concentrated", 0.4)])
def test_student_marginal_equals_teacher_marginal_at_phi(phi):
    T = phi[-1]
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(T), phi)
    # The teacher's q(x_k | x_0) composed from its own per-step transitions (Eq. 2), betas from scratch.
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    mean_T, var_T = [1.0], [0.0]
    for beta in betas.tolist():
        mean_T.append(mean_T[-1] * math.sqrt(1 - beta))
        var_T.append((1 - beta) * var_T[-1] + beta)
    for t in range(len(phi)):                               # Eq. 9 = Eq. 3 at phi_t, what training draws from
        assert math.isclose(math.sqrt(float(a_s[t])), mean_T[phi[t]], rel_tol=1e-9)
        assert math.isclose(1 - float(a_s[t]), var_T[phi[t]], rel_tol=1e-9, abs_tol=1e-12)


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
    ref = sample_ddpm(D, z / a_s[-1].sqrt().item(), phi_sigmas(a_s), noise=lambda x: next(it))
    assert torch.allclose(ours, ref, atol=1e-4)
    assert not torch.allclose(ours, sfddm.sample_ddim(D, z, a_s, clip=False), atol=1e-2)


class Clamped(torch.nn.Module):
    """clamp(D, -1, 1): the clipped x0_hat written as a denoiser, for the reference samplers."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, x, sigma, cond=None):
        return self.D(x, sigma).clamp(-1, 1)


def big_denoiser():
    """A denoiser whose x0_hat leaves [-1, 1] at every level, so the clipping branch is exercised."""
    D = small_denoiser()
    return lambda x, sigma, cond=None: 3 * D(x, sigma) + 2 * x / (1 + common.as_batch(sigma, x) ** 2).sqrt()


@pytest.mark.parametrize("phi", [[0, 256, 512, 768, 1024], [0, 333, 667, 1000]])
def test_clipped_samplers_against_common_samplers_on_the_clamped_denoiser(phi):
    # Evaluation clips x0_hat. DDIM's clip re-derives eps from the clipped x0_hat, so each step is
    # x' = x0c + sigma'(x - x0c)/sigma: Euler on clamp(D). Alg. 2's Eq. 14 mean uses the clipped
    # x0_hat in the posterior: DDPM's ancestral step on clamp(D). Against common's Euler and conftest's DDPM.
    D = big_denoiser()
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(phi[-1]), phi)
    z = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    x_T = z / a_s[-1].sqrt().item()
    with torch.no_grad():
        assert (D(x_T, phi_sigmas(a_s)[0]).abs() > 1).float().mean() > 0.2          # clipping is active
    ddim = sfddm.sample_ddim(D, z, a_s, clip=True)
    assert torch.allclose(ddim, common.sample_euler(Clamped(D), x_T, phi_sigmas(a_s)), atol=1e-4)
    assert not torch.allclose(ddim, sfddm.sample_ddim(D, z, a_s, clip=False), atol=1e-2)
    noises = [torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(10 + k)) for k in range(len(phi))]
    it = iter(noises)
    alg2 = sfddm.sample_ancestral(D, z, a_s, noise=lambda x: next(it), clip=True)
    it = iter(noises)
    ref = sample_ddpm(Clamped(D), x_T, phi_sigmas(a_s), noise=lambda x: next(it))
    assert torch.allclose(alg2, ref, atol=1e-4)
    it = iter(noises)
    assert not torch.allclose(alg2, sfddm.sample_ancestral(D, z, a_s, noise=lambda x: next(it), clip=False), atol=1e-2)


def test_clipped_steps_by_hand():
    # The clipped samplers on one pixel, written out from the formulas (float64), on a chain
    # alpha_bar' = (0.9, 0.6, 0.1) and a network whose x0_hat is always 5 (clipped to 1).
    a_s = torch.tensor([0.9, 0.6, 0.1], dtype=torch.float64)
    D = lambda x, sigma, cond=None: torch.full_like(x, 5.0)
    z, n = 0.3, -0.7
    mean = lambda z, a_t, a_p: ((1 - a_p) * a_t**0.5 * z + (a_p - a_t) * 1.0) / ((1 - a_t) * a_p**0.5)  # Eq. 14
    var = (1 - 0.6) * (0.6 - 0.1) / ((1 - 0.1) * 0.6)                                                  # Eq. 10
    z1 = mean(z, 0.1, 0.6) + var**0.5 * n                                                            # Eq. 13
    expected = mean(z1, 0.6, 0.9)                                                                    # t = 1: no noise
    got = sfddm.sample_ancestral(D, torch.full((1, 1, 1, 1), z, dtype=torch.float64), a_s,
                                 noise=lambda x: torch.full_like(x, n), clip=True)
    assert math.isclose(got.item(), expected, rel_tol=1e-12)
    ddim = lambda z, a_t, a_p: a_p**0.5 * 1.0 + (1 - a_p) ** 0.5 * (z - a_t**0.5 * 1.0) / (1 - a_t) ** 0.5
    got = sfddm.sample_ddim(D, torch.full((1, 1, 1, 1), z, dtype=torch.float64), a_s, clip=True)
    assert math.isclose(got.item(), ddim(ddim(z, 0.1, 0.6), 0.6, 0.9), rel_tol=1e-12)


def test_samplers_clip_by_default():
    """Evaluation clips x0_hat unless told otherwise (the authors' sampling clips)."""
    D, a_s = big_denoiser(), sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1000), [0, 333, 667, 1000])
    z = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    n = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sfddm.sample_ddim(D, z, a_s), sfddm.sample_ddim(D, z, a_s, clip=True))
    assert torch.equal(sfddm.sample_ancestral(D, z, a_s, noise=lambda x: n),
                       sfddm.sample_ancestral(D, z, a_s, noise=lambda x: n, clip=True))
    assert not torch.equal(sfddm.sample_ddim(D, z, a_s), sfddm.sample_ddim(D, z, a_s, clip=False))   # clipping acts


def test_alg2_step_noise_is_its_own_stream(monkeypatch):
    """Alg. 2's step noise comes from a generator seeded common.EVAL_SEED + 1, one draw of the batch's shape per step
    in step order: never the seed of the evaluation's starting noise (EVAL_SEED), which would make a step's noise
    equal to the batch's own x_T."""
    got = []
    monkeypatch.setattr(sfddm, "sample_ancestral", lambda D, z, a_s, noise, clip: got.append(noise))
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), [0, 256, 512, 768, 1024])
    z = torch.zeros(2, 1, 4, 4)
    alg2 = sfddm.phi_samplers(None, a_s, clip=True)["alg2"]
    alg2(z), alg2(z)                                                       # two batches
    g = torch.Generator().manual_seed(common.EVAL_SEED + 1)
    expected = [torch.randn(z.shape, generator=g) for _ in range(6)]       # T' - 1 = 3 noisy steps a batch
    assert [torch.equal(noise(z), e) for noise, e in zip([got[0]] * 3 + [got[1]] * 3, expected)] == [True] * 6


def test_ceiling_dpm3m_spends_its_calls_on_the_phi_levels():
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), [0, 64, 320, 700, 1024])
    calls = []
    D = small_denoiser()
    spy = lambda x, sigma, cond=None: calls.append(float(common.as_batch(sigma, x).flatten()[0])) or D(x, sigma)
    z = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    x = sfddm.phi_samplers(spy, a_s, clip=True)["dpm3m"](z)
    sig = common.sigma_from_alpha_bar(a_s[1:]).flip(0).tolist()
    assert calls == pytest.approx(sig, rel=1e-6)                  # T' calls, at sigma_phi_T' .. sigma_phi_1
    calls.clear()
    assert torch.allclose(x, common.sample_dpmpp(D, z / a_s[-1].sqrt().item(), phi_sigmas(a_s)))


# --- Alg. 1: the loss, its hidden-variable term, and its optimum -------------------------------

def gen(seed):
    return torch.Generator().manual_seed(seed)


def drawn(seed, x0, a_s):
    """What the losses draw from a generator seeded with seed, in Alg. 1's order: t ~ U{1..T'} (line 4), eps (line 5)."""
    g = gen(seed)
    t = torch.randint(1, len(a_s), (len(x0),), generator=g)
    return t, torch.randn(x0.shape, generator=g)


def sfddm_loss(teacher, student, x0, seed, a_s, hidden_weight=1.0):
    loss, parts = sfddm.sfddm_loss(student, teacher, x0, gen(seed), alpha_bar_s=a_s, hidden_weight=hidden_weight)
    return loss, parts["loss_eps"], parts["loss_h"]


def test_loss_terms_and_features_before_the_output_conv():
    teacher = small_denoiser(0).requires_grad_(False)
    student = common.Denoiser(common.student_from(teacher.net))
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), [0, 256, 512, 768, 1024])
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    t, eps = drawn(7, x0, a_s)
    assert sorted(t.tolist()) == [1, 2, 3, 4]                   # every student step once in this batch
    # The teacher is SFDDM's optimum: a student copied from it has exactly zero loss.
    loss, loss_eps, loss_h = sfddm_loss(teacher, student, x0, 7, a_s)
    assert loss.item() == 0 and loss_eps.item() == 0 and loss_h.item() == 0
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    seen = {}
    hooks = [net.conv_out.register_forward_pre_hook(lambda m, inp, k=k: seen.__setitem__(k, inp[0].detach()))
             for k, net in (("teacher", teacher.net), ("student", student.net))]
    loss, loss_eps, loss_h = sfddm_loss(teacher, student, x0, 7, a_s, hidden_weight=0.5)
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
    loss0, _, loss_h0 = sfddm_loss(teacher, student, x0, 7, a_s, hidden_weight=0)
    assert loss_h0.item() == 0 and torch.allclose(loss0, loss_eps)


def test_scratch_loss_is_eq15_on_data():
    student = small_denoiser(1)
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), [0, 256, 512, 768, 1024])
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    t, eps = drawn(3, x0, a_s)
    loss, parts = sfddm.scratch_loss(student, None, x0, gen(3), alpha_bar_s=a_s)        # no teacher
    loss_eps, loss_h = parts["loss_eps"], parts["loss_h"]
    assert loss_eps is loss
    a = a_s[t].float().view(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps                                  # Eq. 16
    with torch.no_grad():
        e_s = (x - a.sqrt() * student(x / a.sqrt(), ((1 - a) / a).sqrt().flatten())) / (1 - a).sqrt()
    assert torch.allclose(loss, ((eps - e_s) ** 2).mean(), rtol=1e-4) and loss_h.item() == 0   # Eq. 15, gamma' = 1


# --- training (the bookkeeping around Alg. 1) ----------------------------------------------------

PHI4 = [0, 256, 512, 768, 1024]


def train_smoke(tmp_path, teacher, net, images, **flags):
    """sfddm.train on the smoke preset, in this process; returns (ema, train_loop's totals)."""
    args = SimpleNamespace(seed=0, resume=False, scratch=False, init="fresh", hidden_weight=1.0,
                           **dict(sfddm.PRESETS["smoke"], images=images))
    vars(args).update(flags)
    ema = common.build_net(net.config).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    data = common.to_uint8(torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1)
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), PHI4)
    return ema, sfddm.train(args, common.Dist("cpu"), teacher, net, ema, data, a_s, PHI4, tmp_path)


def fixed_batch_loss(teacher, net):
    """Alg. 1's loss (total, eps term) of net on one fixed batch: the same seed, so the same t and eps each call."""
    x0 = torch.rand(32, 1, 32, 32, generator=gen(123)) * 2 - 1
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), PHI4)
    with torch.no_grad():
        loss, loss_eps, _ = sfddm_loss(teacher, common.Denoiser(net), x0, 124, a_s)
    return loss.item(), loss_eps.item()


def test_fresh_student_learns(tmp_path):
    # The teacher: a random smoke U-Net with a non-zero output layer (a trained smoke teacher is still
    # ~ a fresh net: its eps differs from a fresh student's by ~1e-3). The fresh student's output layer
    # is zero: it starts far from the teacher at every level.
    teacher = small_denoiser(99).requires_grad_(False)
    torch.manual_seed(0)
    net = common.build_net(teacher.net.config).train()
    before = fixed_batch_loss(teacher, net)
    _, run = train_smoke(tmp_path, teacher, net, 320)
    curve = run["curve"]
    after = fixed_batch_loss(teacher, net)
    # On a fixed batch an unchanged student scores exactly its start (ratio 1). 20 updates at the smoke
    # lr gave ratios (total, eps) of about (0.5, 0.82) for init seeds 0-2; the bounds sit between those
    # and 1, so they fail when training does not reach the weights but not on seed-to-seed variation.
    assert after[0] < 0.75 * before[0] and after[1] < 0.95 * before[1], (before, after)
    assert run["images"] == 320 and [r[0] for r in curve] == list(range(16, 321, 16))
    assert curve[-1][1] < curve[0][1]                                     # and the logged curve falls


def test_teacher_start_leaves_the_weights_bitwise_unchanged(tmp_path):
    # The claim behind skipping --init teacher's training: from a copy of the teacher the loss and its
    # gradient are exactly 0 at every input, so Adam, the warm-up, clipping and the EMA change nothing.
    teacher = small_denoiser(99).requires_grad_(False)
    net = common.student_from(teacher.net)
    ema, run = train_smoke(tmp_path, teacher, net, 64, init="teacher")
    assert run["loss_start"] == 0 and all(r[1:] == [0.0, 0.0, 0.0] for r in run["curve"])
    for k, v in teacher.net.state_dict().items():
        assert torch.equal(net.state_dict()[k], v) and torch.equal(ema.state_dict()[k], v), k


def test_scratch_trains_without_a_teacher(tmp_path):
    torch.manual_seed(0)
    net = common.build_net(small_denoiser().net.config).train()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    _, run = train_smoke(tmp_path, None, net, 64, scratch=True)      # teacher None: never called
    assert run["images"] == 64 and all(r[3] == 0 for r in run["curve"])
    assert any(not torch.equal(start[k], v) for k, v in net.state_dict().items())


# --- command line ---------------------------------------------------------------------------

def cli(tmp_path, fashion_dir, smoke_teacher, out, *extra, torchrun=0):
    return run_script("sfddm.py", "--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher,
                      "--out", tmp_path / out, *extra, cwd=tmp_path, torchrun=torchrun)


@pytest.mark.parametrize("extra, msg", [(("--nfe", 1), "T' >= 2"), (("--nfe", 2048), "T = 1024"),
                                        (("--scratch", "--init", "teacher"), "drop --init teacher")])
def test_bad_arguments_are_one_line(tmp_path, fashion_dir, smoke_teacher, extra, msg):
    r = cli(tmp_path, fashion_dir, smoke_teacher, "bad", *extra)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr


ROW_KEYS = ("method", "variant", "dataset", "preset", "nfe", "fid", "fid_n", "teacher_fid_dpm3m", "teacher_fid_euler",
            "train_seconds", "images_seen", "teacher_rms", "teacher_rms_dpm3m", "teacher_rms_euler")


def test_smoke_end_to_end_rows_ceiling_and_resume_continue_exactly(tmp_path, fashion_dir, smoke_teacher):
    r = cli(tmp_path, fashion_dir, smoke_teacher, "full", "--images", 64)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ddim", "alg2"):                            # both samplers, each its own row
        m = json.loads((tmp_path / "full" / name / "metrics.json").read_text())
        assert all(k in m for k in ROW_KEYS) and (tmp_path / "full" / name / "samples.png").exists()
        assert m["method"] == "sfddm" and m["variant"] == f"sfddm-{name}" and m["init"] == "fresh"
        assert m["nfe"] == 4 and m["images_seen"] == 64 and m["phi"] == PHI4 and m["teacher_rms"] > 0
    for name in ("ddim", "alg2", "dpm3m"):                   # the ceiling rows beside the run: no training claimed
        m = json.loads((tmp_path / "sfddm-teacher-nfe4" / name / "metrics.json").read_text())
        assert m["method"] == "teacher" and m["variant"] == f"teacher-phi-{name}" and m["phi"] == PHI4
        assert m["train_seconds"] == 0 and m["images_seen"] == 0 and m["nfe"] == 4
    for f in ("student.pt", "checkpoint.pt", "loss.png"):
        assert (tmp_path / "full" / f).exists(), f
    rows = list(csv.reader(open(tmp_path / "full" / "loss.csv")))
    assert rows[0] == ["stage", "images", "loss", "loss_eps", "loss_h"] and [int(r[1]) for r in rows[1:]] == [16, 32, 48, 64]
    assert {r[0] for r in rows[1:]} == {"sfddm"}
    out = r.stdout.strip().splitlines()
    assert sum("student" in line and "teacher_rms" in line for line in out) == 5        # 2 rows + 3 ceiling rows
    # Stopped at 32 images and resumed to 64: the same weights and loss curve as the uninterrupted run;
    # the ceiling rows are already there, so they are not recomputed.
    r = cli(tmp_path, fashion_dir, smoke_teacher, "split", "--images", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ceiling rows (the teacher on phi) already in" in r.stdout + r.stderr
    r = cli(tmp_path, fashion_dir, smoke_teacher, "split", "--images", 64, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming sfddm at 32 of 64 images" in r.stdout + r.stderr
    full = common.load_checkpoint(tmp_path / "full" / "student.pt", "sfddm-student")
    split = common.load_checkpoint(tmp_path / "split" / "student.pt", "sfddm-student")
    assert split["images_seen"] == 64
    for k, v in full["ema"].items():
        assert torch.allclose(v, split["ema"][k], atol=1e-6), k
    curve = lambda run: np.loadtxt(tmp_path / run / "loss.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    assert np.allclose(curve("split"), curve("full"), rtol=1e-5)
    # --init teacher: nothing to train, so nothing is trained; the rows are the (existing) ceiling rows.
    r = cli(tmp_path, fashion_dir, smoke_teacher, "tinit", "--init", "teacher")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training skipped" in r.stdout + r.stderr   # the folder is test-written and locked first: nothing else in it
    assert [p.name for p in (tmp_path / "tinit").rglob("*")] == [".lock"]
    # --scratch: the baseline's rows, its own run folder.
    r = cli(tmp_path, fashion_dir, smoke_teacher, "scratch", "--scratch", "--images", 32)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "scratch" / "ddim" / "metrics.json").read_text())
    assert m["variant"] == "sfddm-scratch-ddim" and m["scratch"] is True and m["images_seen"] == 32
    # The results table has one row per metrics.json: each ceiling row once.
    table = fid.results_table(tmp_path)
    assert table.count("| teacher-phi-ddim |") == 1 and table.count("| sfddm-ddim |") == 2
    assert "| sfddm-scratch-alg2 | 4 |" in table


def test_torchrun_two_processes(tmp_path, fashion_dir, smoke_teacher):
    r = cli(tmp_path, fashion_dir, smoke_teacher, "ddp", "--subseq", "concentrated", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout + r.stderr
    m = json.loads((tmp_path / "ddp" / "alg2" / "metrics.json").read_text())
    assert m["variant"] == "sfddm-alg2-concentrated" and m["images_seen"] == 64 and m["subseq"] == "concentrated"
    assert (tmp_path / "sfddm-teacher-nfe4-concentrated" / "dpm3m" / "metrics.json").exists()


# --- the paper preset, the teacher's table, every loss term, and what main builds ---------------------------

# (key, value, source: the paper's App. D, as PRESETS cites it; flag defaults: Alg. 1 and the header)
PAPER = [("lr", 2e-5, "App. D: Adam lr 2e-5, fixed"), ("warmup", 0, "App. D: no warm-up"), ("batch", 128, "DDPM's 128"),
         ("grad_clip", None, "App. D: no clipping"), ("images", 12_800_000, "~0.1 M steps of 128 (Tab. 2)"),
         ("teacher_steps", 1024, "T = 1024"), ("subseq", "scattered", "Sec. 3.6"), ("hidden_weight", 1.0, "get_sl's term"),
         ("init", "fresh", "a fresh student (the paper, the authors' code)"), ("scratch", False, "distillation")]


@pytest.mark.parametrize("key,value,source", PAPER)
def test_paper_preset_values(key, value, source):
    assert getattr(sfddm.parse_args(["--preset", "paper"]), key) == value, source


def test_paper_ema_is_ddpms_per_step_rate_and_the_teacher_table_is_scaled_linear():
    """EMA 0.9999 per step at batch 128 (DDPM) as a half-life in images; the teacher's betas run linearly from
    1e-4*1000/T to 0.02*1000/T (the authors' linear_beta_schedule)."""
    assert common.ema_beta(128, sfddm.PRESETS["paper"]["ema"]) == pytest.approx(0.9999, abs=1e-7)     # 6,931 steps
    for T in (1000, 1024, 2000):
        abar = sfddm.teacher_alpha_bar(T).double()
        betas = 1 - abar[1:] / abar[:-1]
        assert abar[0] == 1 and betas.tolist() == pytest.approx(np.linspace(1e-4, 0.02, T) * 1000 / T, rel=1e-9)


def test_the_hidden_term_is_on_by_default_and_changes_the_gradient():
    """lambda_h = 1 by default (--hidden-weight), and its term moves the student's gradient."""
    teacher = small_denoiser(0).requires_grad_(False)
    student = common.Denoiser(common.build_net(teacher.net.config))
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), PHI4)
    x0 = torch.rand(4, 1, 32, 32, generator=gen(1)) * 2 - 1
    grads = []
    for w in (1.0, 0.0):
        loss, _ = sfddm.sfddm_loss(student, teacher, x0, gen(2), alpha_bar_s=a_s, hidden_weight=w)
        grads.append(torch.autograd.grad(loss, list(student.parameters()), allow_unused=True))
    assert any(a is not None and (b is None or (a - b).abs().max() > 1e-6) for a, b in zip(*grads))
    assert sfddm.parse_args(["--preset", "smoke"]).hidden_weight == 1.0
    total, parts = sfddm.sfddm_loss(student, teacher, x0, gen(2), alpha_bar_s=a_s)   # the function's own default too
    assert torch.equal(total, parts["loss_eps"] + parts["loss_h"]) and parts["loss_h"] > 0


def test_main_builds_adam_the_ramp_the_ema_and_samples_the_ema(fashion_dir, random_teacher, tmp_path, monkeypatch):
    """What sfddm.main hands the loop and the reports (MainSpy): a fresh U-Net of the teacher's config (not its copy)
    in train mode, Adam at --lr with its warm-up ramp and clipping, the EMA at the half-life's rate; the reports
    sample the EMA in eval mode with DDIM and Alg. 2 on the student's chain; the ceiling rows are the teacher's."""
    monkeypatch.chdir(tmp_path)
    spy = MainSpy(monkeypatch)
    monkeypatch.setattr("sys.argv", ["sfddm.py", "--preset", "smoke", "--nfe", "4", "--data-dir", str(fashion_dir),
                                     "--teacher", str(random_teacher), "--out", str(tmp_path / "run")])
    sfddm.main()
    (loop,), cfg = spy.loops, sfddm.PRESETS["smoke"]
    teacher = common.load_denoiser(random_teacher)
    opt, net, ema = loop["opt"], loop["nets"]["net"], loop["nets"]["ema"]
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.Adam and (group["lr"], group["betas"], group["eps"]) == (cfg["lr"], (0.9, 0.999), 1e-8)
    b = loop["budget"]
    assert (b.total, b.unit, b.batch, b.lr, b.clip) == (cfg["images"], "images", cfg["batch"], cfg["lr"], 1.0)
    assert [b.schedule(1.0, d, 64) for d in (0, 16, 32)] == pytest.approx([0.5, 1.0, 1.0])    # warm-up of 32 images
    ((e, model, beta),) = loop["emas"]
    assert e is ema and model is net and beta == pytest.approx(0.5 ** (cfg["batch"] / cfg["ema"]))
    assert loop["training"]["net"] and loop["student"].net is net and net.config == teacher.net.config
    assert any(not torch.equal(v, teacher.net.state_dict()[k]) for k, v in loop["states"]["net"].items())   # fresh
    assert all(torch.equal(v, loop["states"]["net"][k]) for k, v in loop["states"]["ema"].items())          # EMA = net
    assert loop["loss"].func is sfddm.sfddm_loss and loop["loss"].keywords["hidden_weight"] == 1.0
    phi = [0, 256, 512, 768, 1024]
    a_s = sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(1024), phi)
    assert torch.equal(loop["loss"].keywords["alpha_bar_s"], a_s)
    reports = {r["out"].name: r for r in spy.reports}
    assert sorted(reports) == ["alg2", "ddim", "dpm3m"] and len(spy.reports) == 5          # the run's two, the ceiling's 3
    run = [r for r in spy.reports if r["out"].parent.name == "run"]
    z = torch.randn(2, 1, 32, 32, generator=gen(0))
    D_ema = common.Denoiser(ema)
    for r in run:
        assert r["training"][id(ema)] is False
    ddim = [r for r in run if r["out"].name == "ddim"][0]["sample_fn"]
    assert torch.equal(ddim(z), sfddm.sample_ddim(D_ema, z, a_s)) and not torch.allclose(
        ddim(z), sfddm.sample_ddim(common.Denoiser(net), z, a_s), atol=1e-4)
    ceiling = [r for r in spy.reports if r["out"].parent.name != "run"]
    assert all(r["info"]["method"] == "teacher" for r in ceiling) and len(ceiling) == 3
