"""Tests of the substrate's math and behaviour (common.py)."""
import hashlib
import importlib
import io
import json
import math
import pathlib
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import common
import fid
from conftest import MainSpy, gaussian_denoiser, make_fashion, run_script, sample_ddpm

torch.set_num_threads(2)


# --- EDM preconditioning and the VP adapters ------------------------------------------------

def test_edm_precond_identities():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = common.edm_precond(sigma)
    sd = common.SIGMA_DATA
    # Unit-variance network input (EDM Eq. 114) ...
    assert torch.allclose(c_in**2 * (sigma**2 + sd**2), torch.ones_like(sigma))
    # ... and unit-variance training target F = (x0 - c_skip*x)/c_out for x0 of std sd (Eq. 117).
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    assert torch.allclose(target_var, torch.ones_like(sigma))
    assert torch.allclose(c_noise, sigma.log() / 4)
    # Table 1 for another sigma_data (a published teacher may use one): c_skip = sd^2/(s^2 + sd^2), c_out = s sd/sqrt(..).
    skip, out, inp, _ = common.edm_precond(torch.tensor([0.3, 2.0], dtype=torch.float64), sigma_data=0.8)
    assert skip.tolist() == pytest.approx([0.64 / 0.73, 0.64 / 4.64], rel=1e-12)
    assert out.tolist() == pytest.approx([0.24 / 0.73**0.5, 1.6 / 4.64**0.5], rel=1e-12)
    assert inp.tolist() == pytest.approx([0.73**-0.5, 4.64**-0.5], rel=1e-12)
    # c_skip -> 1 (identity) as sigma -> 0.
    assert c_skip[0] > 0.9999


def test_denoiser_at_init_is_c_skip_times_x():
    net = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"])      # zero-initialised output conv
    x, sigma = torch.randn(3, 1, 32, 32), torch.tensor([0.1, 1.0, 10.0])
    c_skip = common.edm_precond(sigma.reshape(-1, 1, 1, 1))[0]
    assert torch.allclose(common.Denoiser(net)(x, sigma), c_skip * x)


class AffineNet(torch.nn.Module):
    """F(x, c_noise) = 0.1 x + c_noise: a network whose output depends on both inputs."""
    config = {}

    def forward(self, x, c_noise, cond=None):
        return 0.1 * x + c_noise.view(-1, 1, 1, 1)


def test_denoiser_is_edms_table1_with_sigma_data_one_half():
    """D(x; s) = c_skip x + c_out F(c_in x, ln(s)/4), sigma_data = 0.5 (EDM Table 1), written out by hand."""
    x, s = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0.2, 5.0], dtype=torch.float64).view(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), 0.5 * s / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    expected = c_skip * x + c_out * (0.1 * c_in * x + s.log() / 4)
    assert common.SIGMA_DATA == 0.5
    assert torch.allclose(common.Denoiser(AffineNet())(x.float(), s.flatten().float()).double(), expected, atol=1e-5)


def test_ema_update_averages_parameters_and_copies_buffers():
    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    common.ema_update(ema, model, 0.75)
    assert ema.weight.tolist() == pytest.approx([0.75 * 1 + 0.25 * 3] * 3) and ema.running_mean.tolist() == [7.0] * 3


def test_vp_sigma_round_trips():
    sigma = torch.logspace(-3, 2, 20, dtype=torch.float64)
    alpha, s = common.vp_from_sigma(sigma)
    assert torch.allclose(alpha**2 + s**2, torch.ones_like(sigma))
    # The values themselves (a round trip s/alpha = sigma holds for any alpha): alpha = 1/sqrt(1 + sigma^2).
    a, b = common.vp_from_sigma(torch.tensor([0.0, 1.0, 80.0], dtype=torch.float64))
    assert a.tolist() == pytest.approx([1.0, 0.5**0.5, 6401**-0.5], rel=1e-14)
    assert b.tolist() == pytest.approx([0.0, 0.5**0.5, 80 * 6401**-0.5], rel=1e-14)
    assert common.vp_from_sigma(2.0)[0].dtype == torch.float64                  # a number: float64
    # The cosine schedule at t = 1/2 is logsnr 0 (alpha = s); its ends are logsnr_max and logsnr_min.
    assert common.cosine_logsnr(torch.tensor([0.0, 1.0]), -6.0, 4.0).tolist() == pytest.approx([4, -6], abs=1e-6)
    alpha_t, s_t = common.cosine_alpha_sigma(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), -6.0, 6.0)
    assert (alpha_t**2).tolist() == pytest.approx([1 / (1 + math.exp(-6)), 0.5, 1 / (1 + math.exp(6))], rel=1e-12)
    assert (s_t**2).tolist() == pytest.approx([1 / (1 + math.exp(6)), 0.5, 1 / (1 + math.exp(-6))], rel=1e-12)
    # The DDPM table by hand: alpha_bar_t = prod (1 - beta_s), betas linear from beta_1 to beta_T; sigma = sqrt((1 - abar)/abar).
    assert common.ddpm_alpha_bar(3, 0.1, 0.3).tolist() == pytest.approx([1, 0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7], rel=1e-12)
    assert len(common.ddpm_alpha_bar()) == 1001                                 # DDPM's T = 1000 by default (+ t = 0)
    assert common.sigma_from_alpha_bar(torch.tensor([0.5, 0.2])).tolist() == pytest.approx([1, 2])
    assert torch.allclose(common.sigma_from_vp(alpha, s), sigma)
    t = torch.linspace(0.01, 0.99, 30, dtype=torch.float64)
    alpha_t, s_t = common.cosine_alpha_sigma(t)
    assert torch.allclose(alpha_t**2 + s_t**2, torch.ones_like(t))
    # PD's cosine schedule: logsnr(t) = -2 ln tan(a t + b) is close to alpha = cos(pi t/2) in the middle.
    assert torch.allclose(alpha_t[10:20], torch.cos(math.pi / 2 * t[10:20]), atol=1e-3)
    abar = common.ddpm_alpha_bar(1000)
    sig = common.sigma_from_alpha_bar(abar[1:])
    a, s = common.vp_from_sigma(sig)
    assert torch.allclose(a**2, abar[1:])
    # The defaults are the PD authors' logsnr_max = 20 at t = 0 and logsnr_min = -20 at t = 1.
    assert common.cosine_logsnr(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([20, -20], abs=1e-6)
    alpha_t, s_t = common.cosine_alpha_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert (alpha_t / s_t).log().mul(2).tolist() == pytest.approx([20, -20], abs=1e-6)


def test_uint8_and_float_images_round_trip():
    """[0, 255] <-> [-1, 1] by v / 127.5 - 1 and round-half-up of x * 127.5 + 127.5 (what a saved PNG holds)."""
    u = torch.arange(256, dtype=torch.uint8)
    assert common.to_float(u).tolist() == pytest.approx([v / 127.5 - 1 for v in range(256)], abs=1e-7)
    assert torch.equal(common.to_uint8(common.to_float(u)), u)
    assert common.to_uint8(torch.tensor([-1.5, -1.0, 1.0, 1.5])).tolist() == [0, 0, 255, 255]   # clamped, not wrapped
    half = (torch.arange(255, dtype=torch.float64) + 0.5) / 127.5 - 1           # x * 127.5 + 127.5 = k + 1/2
    assert common.to_uint8(half.float() + 1e-6).tolist() == list(range(1, 256))  # just above k + 1/2: k + 1
    assert common.to_uint8(half.float() - 1e-6).tolist() == list(range(255))     # just below: k


def test_frozen_teacher_runs_in_fp32_inside_autocast():
    """freeze: the teacher's call inside a bf16 autocast region is its fp32 evaluation, bit for bit; an unfrozen
    Denoiser there computes in bf16 (so the test would see a frozen one that followed autocast)."""
    torch.manual_seed(0)
    net = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"])
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    D = common.Denoiser(net.eval())
    x, sigma = torch.randn(2, 1, 32, 32), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        fp32 = D(x, sigma)
        with torch.autocast("cpu", torch.bfloat16):
            mixed = D(x, sigma)
        assert not torch.equal(mixed.float(), fp32)
        common.freeze(D)
        with torch.autocast("cpu", torch.bfloat16):
            frozen = D(x, sigma)
    assert frozen.dtype == torch.float32 and torch.equal(frozen, fp32)
    assert D.full_precision and not D.training and not any(p.requires_grad for p in D.parameters())


def test_as_batch_makes_b_x_1_x_1_x_1_float32():
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    for value, expected in [(0.5, [0.5] * 3), (torch.tensor(2.0), [2.0] * 3), (torch.tensor([1, 2, 3]), [1.0, 2.0, 3.0])]:
        b = common.as_batch(value, x)
        assert b.shape == (3, 1, 1, 1) and b.dtype == torch.float32 and b.flatten().tolist() == expected


def test_dpmpp_lands_on_the_denoised_image_at_sigma_0():
    """A grid ending in 0 (DPM-Solver++ at lambda = inf): the last step returns D(x, t_cur), no solver step.
    D = x/2 on [2, 1, 0]: step 1 (order 1) x = (1/2) x - expm1(-ln 2) D = 0.5 + 0.25 = 0.75; then D(0.75) = 0.375."""
    out = common.sample_dpmpp(lambda x, s: 0.5 * x, torch.ones(1, 1, 1, 1, dtype=torch.float64), [2.0, 1.0, 0.0])
    assert out.item() == pytest.approx(0.375, rel=1e-12)


def test_vp_predict_is_consistent():
    torch.manual_seed(0)
    D = lambda x, sigma, cond=None: 0.3 * x.tanh() / (1 + common.as_batch(sigma, x))   # any denoiser of x and sigma
    z = torch.randn(4, 1, 8, 8)
    alpha, s = common.vp_from_sigma(torch.tensor([0.5, 1.0, 2.0, 7.0]))
    x0, eps, v = common.vp_predict(D, z, alpha, s)
    a, sb = alpha.float().reshape(-1, 1, 1, 1), s.float().reshape(-1, 1, 1, 1)
    assert torch.allclose(x0, D(z / a, sb / a), atol=1e-6)
    assert torch.allclose(a * x0 + sb * eps, z, atol=1e-5)              # z = alpha x0 + s eps
    assert torch.allclose(a * z - sb * v, x0, atol=1e-5)                # x0 = alpha z - s v
    assert torch.allclose(sb * z + a * v, eps, atol=1e-5)               # eps = s z + alpha v


# --- Schedules ---------------------------------------------------------------------------

def test_karras_grid_endpoints():
    sig = common.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(sig) == 18 and sig[0].item() == pytest.approx(80.0) and sig[-1].item() == pytest.approx(0.002)
    assert (sig[1:] < sig[:-1]).all()
    # CD's two-step sampler uses grid index 11 of 18: sigma = 0.585 (cd.py's DEFAULT_TAUS).
    assert sig[11].item() == pytest.approx(0.5848, abs=1e-3)
    # SFD's NFE-2 grid with AFS: 4 points 80, 10.929, 0.670, 0.006.
    assert common.karras_sigmas(4, 0.006, 80.0).tolist() == pytest.approx([80, 10.929, 0.670, 0.006], abs=1e-3)
    assert common.karras_sigmas(1).tolist() == [80.0]                            # one point: sigma_max


class Counter:
    """An analytic denoiser that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.fn(x, sigma)


@pytest.mark.parametrize("sampler,nfe", [("euler", 1), ("euler", 5), ("heun", 3), ("heun", 7), ("dpm2m", 6),
                                         ("dpm3m", 4), ("ddpm", 3)])
def test_teacher_sigmas_spend_exactly_nfe(sampler, nfe):
    """Every call is a step of the grid 80 -> 0.002: none is spent on a final denoising at 0.002."""
    D = Counter(lambda x, s: 0.5 * x)
    sigmas = common.teacher_sigmas(sampler, nfe)
    dict(common.SAMPLERS, ddpm=sample_ddpm)[sampler](D, torch.randn(2, 1, 4, 4), sigmas)
    assert D.calls == nfe and sigmas[0] == 80 and sigmas[-1] == pytest.approx(0.002)
    assert len(sigmas) - 1 == ((nfe + 1) // 2 if sampler == "heun" else nfe)


def test_heun_rejects_even_nfe():
    with pytest.raises(common.UserError, match="odd NFE"):
        common.teacher_sigmas("heun", 4)
    for sampler in common.SAMPLERS:
        with pytest.raises(common.UserError, match="exactly 0 network calls") as e:
            common.teacher_sigmas(sampler, 0)
        assert ("odd NFE" in str(e.value)) == (sampler == "heun")                  # Heun's reason for Heun only


def test_dpmpp_order_rule_and_the_orders_the_sampler_uses(monkeypatch):
    """3M: warm-up 1, 2, then 3, lowered to the steps left at the end (n - i); 2M likewise with 2."""
    table = {1: [1], 2: [1, 2], 3: [1, 2, 1], 4: [1, 2, 2, 1], 5: [1, 2, 3, 2, 1], 6: [1, 2, 3, 3, 2, 1]}
    for n, orders in table.items():
        assert [common.dpmpp_order(i, n) for i in range(n)] == orders
        assert [common.dpmpp_order(i, n, lower_order_final=False) for i in range(n)] == [min(i + 1, 3) for i in range(n)]
    assert [common.dpmpp_order(i, 4, order=2) for i in range(4)] == [1, 2, 2, 1]
    used, step = [], common.dpmpp_step
    monkeypatch.setattr(common, "dpmpp_step", lambda *a: used.append(a[-1]) or step(*a))
    common.sample_dpmpp(lambda x, s: 0.5 * x, torch.ones(1, 1, 2, 2), common.karras_sigmas(6))   # 5 steps, none to 0
    assert used == [1, 2, 3, 2, 1]
    used.clear()
    common.sample_dpmpp(lambda x, s: 0.5 * x, torch.ones(1, 1, 2, 2), common.karras_sigmas(5))   # 4 steps: 3M's default
    assert used == [1, 2, 2, 1]


def test_heun_euler_last_skips_only_the_last_corrector():
    """euler_last: the last step is Euler (1 call), every other step Heun (2 calls); on a grid ending
    at 0 it changes nothing (EDM's rule already skips that corrector)."""
    D = Counter(lambda x, s: 0.5 * x + 0.1 * s)
    x, grid = torch.randn(2, 1, 4, 4, dtype=torch.float64), common.karras_sigmas(4)
    out = common.sample_heun(D, x, grid, euler_last=True)
    assert D.calls == 2 + 2 + 1
    two_heun = common.sample_heun(D, x, grid[:-1])                 # both steps corrected (they end above 0)
    assert torch.allclose(out, common.sample_euler(D, two_heun, grid[-2:]))
    assert not torch.allclose(out, common.sample_heun(D, x, grid))  # the corrector does change that step
    zero = common.append_zero(grid)
    assert torch.equal(common.sample_heun(D, x, zero, euler_last=True), common.sample_heun(D, x, zero))


# --- Samplers on an analytic Gaussian ------------------------------------------------------

MU, C = 0.3, 0.4        # data = N(MU, C^2) per pixel: D(x, sigma) = MU + C^2/(C^2 + sigma^2) (x - MU) exactly
gaussian_D = gaussian_denoiser(MU, C**2)


def exact_ode(x, sigma_from, sigma_to):
    """The probability-flow ODE of that Gaussian: x - MU scales with sqrt(C^2 + sigma^2)."""
    return MU + math.sqrt(C**2 + sigma_to**2) / math.sqrt(C**2 + sigma_from**2) * (x - MU)


def sampler_error(name, steps, sigma_min=0.05, sigma_max=20.0):
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    sig = common.karras_sigmas(steps + 1, sigma_min, sigma_max)
    out = common.SAMPLERS[name](gaussian_D, x, sig)
    return (out - exact_ode(x, sigma_max, sigma_min)).abs().max().item()


@pytest.mark.parametrize("name,order,lo,hi", [("euler", 1, 0.8, 1.3), ("heun", 2, 1.7, 2.4), ("dpm2m", 2, 1.7, 2.5)])
def test_sampler_convergence_order(name, order, lo, hi):
    e1, e2 = sampler_error(name, 64), sampler_error(name, 128)
    observed = math.log2(e1 / e2)
    assert lo < observed < hi, f"{name}: observed order {observed:.2f}, expected ~{order}"


def test_dpm3m_converges_at_about_third_order_at_practical_step_counts():
    """Its first-order start and end steps make it second order asymptotically (64 -> 128 steps
    shows ~2.1); at 16 -> 32 steps it converges at ~3.7."""
    observed = math.log2(sampler_error("dpm3m", 16) / sampler_error("dpm3m", 32))
    assert 2.8 < observed < 4.5


def dpmpp_local_error(order, h, r0=0.6, r1=1.7):
    """One dpmpp_step of h in lambda = -ln sigma from the exact solution with exact history, whose past steps are
    r0*h and r1*h (not h: uniform steps would hide the r0, r1 weights)."""
    x0 = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = [-(r0 + r1) * h, -r0 * h, 0.0, h]                      # lambda_-2, lambda_-1, lambda_0, lambda_1
    sig = [math.exp(-v) for v in lam]                            # sigma_-2, sigma_-1, sigma_0, sigma_1
    xs = [exact_ode(x0, 1.0, s) for s in sig]
    history = [(gaussian_D(xs[1], sig[1]), r0 * h), (gaussian_D(xs[0], sig[0]), r1 * h)]
    out = common.dpmpp_step(xs[2], sig[2], sig[3], gaussian_D(xs[2], sig[2]), history, order)
    return (out - xs[3]).abs().max().item()


@pytest.mark.parametrize("order,local_order", [(1, 2), (2, 3), (3, 3)])
def test_dpmpp_local_error_orders(order, local_order):
    """Local error O(h^(p+1)) for orders 1 and 2. The third-order step, with the D2 coefficient
    -phi3 (as in the DPM-Solver, k-diffusion and diffusers code), also shows O(h^3):
    a Taylor expansion gives D2 = h^2 D''/2 and an exact weight of -2*phi3, so that term is
    under-weighted by half. fewstep keeps the reference formula so its teacher matches theirs."""
    observed = math.log2(dpmpp_local_error(order, 0.1) / dpmpp_local_error(order, 0.05))
    assert abs(observed - local_order) < 0.2
    if order == 3:
        assert dpmpp_local_error(3, 0.05) < 0.5 * dpmpp_local_error(2, 0.05)     # still better than 2M


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2m", "dpm3m"])
def test_samplers_exact_for_a_point_mass(name):
    """With data = one point, D(x, sigma) = MU for every x and the ODE's solution is x(sigma) = MU + (sigma/80)(x - MU):
    each deterministic sampler follows it exactly at every step of a grid that stays above 0 (on a grid ending at 0
    the last step would return D = MU whatever came before)."""
    x, grid, seen = torch.randn(16, dtype=torch.float64) * 80, common.karras_sigmas(7), []
    common.SAMPLERS[name](lambda x, s: torch.full_like(x, MU), x, grid, lambda i, x_i: seen.append(x_i))
    for x_i, sigma in zip(seen, grid[1:].tolist()):
        assert torch.allclose(x_i, MU + sigma / 80 * (x - MU), rtol=1e-12, atol=1e-12)


def test_ddpm_keeps_the_marginal_of_a_point_mass():
    """Ancestral DDPM with D = MU: x - MU stays N(0, sigma_i^2) at every sigma_i (sigma_down^2 + sigma_up^2 =
    sigma_next^2), and the last step to 0 lands on MU."""
    g = torch.Generator().manual_seed(0)
    x, grid, seen = torch.randn(200_000, dtype=torch.float64, generator=g) * 80, common.karras_sigmas(5), []
    noise = lambda x: torch.randn(x.shape, dtype=x.dtype, generator=g)
    out = sample_ddpm(lambda x, s: torch.full_like(x, MU), x, common.append_zero(grid), lambda i, x_i: seen.append(x_i),
                             noise=noise)
    for x_i, sigma in zip(seen, grid[1:].tolist()):
        assert (x_i - MU).std().item() == pytest.approx(sigma, rel=0.01) and abs((x_i - MU).mean().item()) < 0.01 * sigma
    assert torch.equal(out, torch.full_like(out, MU))


def test_samplers_approach_the_exact_ode_solution():
    """200 steps from sigma 20 to 0.05 (outputs of size ~1): the higher the order, the closer."""
    errors = {name: sampler_error(name, 200) for name in ("euler", "heun", "dpm3m")}
    assert errors["euler"] < 2e-2 and errors["heun"] < 3e-4 and errors["dpm3m"] < 5e-5


def test_dpmpp_order2_step_matches_formula():
    """One second-order step against the formula written out (arXiv:2211.01095, Alg. 2)."""
    D = Counter(gaussian_D)
    x = torch.randn(4, dtype=torch.float64)
    sig = [10.0, 3.0, 1.0]
    seen = []
    common.sample_dpmpp(D, x, sig + [0.5], order=2, callback=lambda i, xi: seen.append(xi))
    x1 = seen[0]
    D0, Dm1 = gaussian_D(x1, 3.0), gaussian_D(x, 10.0)
    h, h_prev = math.log(3.0 / 1.0), math.log(10.0 / 3.0)
    phi1 = math.expm1(-h)
    expect = (1.0 / 3.0) * x1 - phi1 * D0 - 0.5 * phi1 * (D0 - Dm1) / (h_prev / h)
    assert torch.allclose(seen[1], expect)


def test_dpmpp_order3_step_matches_the_reference_form():
    """A third-order step on steps of unequal length, in k-diffusion's form (sample_dpmpp_3m_sde at eta = 0):
    x = e^-h x + (1 - e^-h) D0 + phi2 d1 - phi3 d2, r0 = h_-1/h, r1 = h_-2/h."""
    D = Counter(gaussian_D)
    x = torch.randn(4, dtype=torch.float64)
    sig, seen = [20.0, 5.0, 2.0, 0.4, 0.3], []
    common.sample_dpmpp(D, x, sig, order=3, lower_order_final=False, callback=lambda i, xi: seen.append(xi))
    D_2, D_1, D0 = gaussian_D(x, 20.0), gaussian_D(seen[0], 5.0), gaussian_D(seen[1], 2.0)
    h, h_1, h_2 = math.log(2.0 / 0.4), math.log(5.0 / 2.0), math.log(20.0 / 5.0)
    r0, r1 = h_1 / h, h_2 / h
    d1_0, d1_1 = (D0 - D_1) / r0, (D_1 - D_2) / r1
    d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
    phi2 = math.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    expect = math.exp(-h) * seen[1] + (1 - math.exp(-h)) * D0 + phi2 * d1 - phi3 * d2
    assert torch.allclose(seen[2], expect, rtol=1e-12) and not torch.allclose(seen[2], expect - phi2 * d1, rtol=1e-6)


def test_ddpm_step_is_the_ddpm_posterior():
    """sample_ddpm's step from t to t-1 equals Ho et al. Eq. 7 in VP coordinates."""
    abar = common.ddpm_alpha_bar(1000)
    t = 500
    sig_t, sig_prev = common.sigma_from_alpha_bar(abar[t]).item(), common.sigma_from_alpha_bar(abar[t - 1]).item()
    x0 = torch.randn(1000, dtype=torch.float64)
    z_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn(1000, dtype=torch.float64)
    noise = torch.randn(1000, dtype=torch.float64)
    x_prev = sample_ddpm(lambda x, s: x0, z_t / abar[t].sqrt(), [sig_t, sig_prev], noise=lambda x: noise)
    beta_t = 1 - abar[t] / abar[t - 1]
    mean = abar[t - 1].sqrt() * beta_t / (1 - abar[t]) * x0 + (1 - beta_t).sqrt() * (1 - abar[t - 1]) / (1 - abar[t]) * z_t
    var = (1 - abar[t - 1]) / (1 - abar[t]) * beta_t
    assert torch.allclose(abar[t - 1].sqrt() * x_prev, mean + var.sqrt() * noise, atol=1e-10)


# --- The U-Net -----------------------------------------------------------------------------

def make_net(cond_dim=0, seed=0):
    torch.manual_seed(seed)
    net = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"], cond_dim=cond_dim)
    for p in net.parameters():                      # non-zero output conv so the tests see the whole net
        p.data += 0.01 * torch.randn_like(p)
    return net


def test_unet_outputs_attention_features_and_halves():
    net = make_net().eval()
    x, c = torch.randn(2, 1, 32, 32), torch.tensor([0.1, -0.5])
    out = net(x, c)
    name = net.attn_names[-1]
    out2, extras = net(x, c, attn=name, features=True)
    assert torch.equal(out, out2)
    attn = extras["attn"]
    assert attn.shape == (2, net.config["heads"], 16 * 16, 16 * 16)
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)   # rows are distributions
    feat = extras["features"]
    assert torch.allclose(net.conv_out(feat), out)                # the map right before the output conv
    h, skips, emb = net.encode(x, c)
    assert torch.allclose(net.conv_out(net.decode(h, skips, emb)), out)
    with pytest.raises(common.UserError):
        net(x, c, attn="nope")


def test_extra_conditioning_is_a_noop_at_init():
    teacher = make_net().eval()
    student = common.student_from(teacher, cond_dim=7).eval()
    x, c, cond = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 1.0]), torch.randn(2, 7)
    assert torch.equal(student(x, c, cond), teacher(x, c))
    # ...and it is a real input: after a change to its map, the output moves.
    student.down[0].res.cond.weight.data.normal_()
    assert not torch.allclose(student(x, c, cond), teacher(x, c))


def test_paper_config_is_ddpm_cifar10_size():
    assert common.count_params(common.UNet(in_ch=3, **common.NET_CONFIGS["paper"])) == 35_746_307


# --- Data ----------------------------------------------------------------------------------

def test_fashion_loader_reads_idx_and_pads(fashion_dir):
    x, y = common.load_dataset("fashion", fashion_dir)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.uint8 and y.shape == (64,)
    assert x[:, :, :2].max() == 0 and x[:, :, :, -2:].max() == 0          # 2-pixel black border
    xt, _ = common.load_dataset("fashion", fashion_dir, split="test")
    assert xt.shape[0] == 16


def test_fashion_loader_refuses_corrupt_and_missing(tmp_path):
    bad = make_fashion(tmp_path / "bad")
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(common.UserError, match="gzip"):
        common.load_dataset("fashion", bad)
    with pytest.raises(common.UserError, match="apt-get install dataset-fashion-mnist"):
        common.load_dataset("fashion", tmp_path / "empty")


def cifar_tarball(path, n=4):
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batches[name] = data
            raw = pickle.dumps({b"data": data, b"labels": list(range(n))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


def test_cifar_tarball_checked_and_read(tmp_path, monkeypatch):
    batches = cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(common.UserError, match="checksum"):
        common.load_dataset("cifar10", tmp_path)                        # not the real md5: refused
    monkeypatch.setattr(common, "CIFAR10_MD5", hashlib.md5((tmp_path / "cifar-10-python.tar.gz").read_bytes()).hexdigest())
    x, y = common.load_dataset("cifar10", tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.tolist() == list(range(4)) * 5
    assert torch.equal(x[0], torch.from_numpy(batches["data_batch_1"][0].reshape(3, 32, 32)))
    xt, _ = common.load_dataset("cifar10", tmp_path, split="test")
    assert torch.equal(xt[3], torch.from_numpy(batches["test_batch"][3].reshape(3, 32, 32)))


def test_cifar_extracted_batches(tmp_path, monkeypatch):
    with tarfile.open(fileobj=io.BytesIO(), mode="w"):
        pass
    cifar_tarball(tmp_path / "t.tar.gz")
    with tarfile.open(tmp_path / "t.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    monkeypatch.setattr(common, "CIFAR10_BATCH_MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()   # these batches' md5
                                                      for p in (tmp_path / "x" / "cifar-10-batches-py").iterdir()})
    x, _ = common.load_dataset("cifar10", tmp_path / "x")
    assert x.shape == (20, 3, 32, 32)
    (tmp_path / "x" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="not a CIFAR-10"):
        common.load_dataset("cifar10", tmp_path / "x")
    with pytest.raises(common.UserError, match="holds neither"):
        common.load_dataset("cifar10", tmp_path / "nothing")


def test_folder_loader_crops_and_resizes(tmp_path):
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "a.png")
    im = np.zeros((40, 80, 3), np.uint8)
    im[:, 20:60] = 200                                                   # the centre square is bright
    Image.fromarray(im).save(tmp_path / "b.jpg", quality=100)
    x, y = common.load_dataset(f"folder:{tmp_path}")
    assert x.shape == (2, 3, 32, 32) and y is None
    assert x[0, 0].float().mean() > 250 and x[0, 1].float().mean() < 5
    assert x[1].float().mean() > 190                                      # only the centre survived the crop
    with pytest.raises(common.UserError):
        common.load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.load_dataset("mnist")


# --- Plumbing ------------------------------------------------------------------------------

def test_per_sample_noise_ignores_batching():
    full = common.PerSampleNoise(3, range(6)).randn(1, 4, 4)
    parts = torch.cat([common.PerSampleNoise(3, range(0, 4)).randn(1, 4, 4),
                       common.PerSampleNoise(3, range(4, 6)).randn(1, 4, 4)])
    assert torch.equal(full, parts)
    assert not torch.equal(full[0], full[1])


def test_ema_update_and_halflife():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    beta = common.ema_beta(64, 64 * 10)
    assert beta**10 == pytest.approx(0.5)                                # half-life of 10 steps
    before = a.weight.detach().clone()
    common.ema_update(a, b, beta)
    assert torch.allclose(a.weight, beta * before + (1 - beta) * b.weight)


def test_checkpoint_atomic_and_checked(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    common.save_checkpoint(path, "thing", value=torch.ones(3), step=1)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(common.UserError, match="no space left on device"):
        common.save_checkpoint(path, "thing", value=torch.zeros(3), step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good                                     # the old file survived
    assert not (tmp_path / "ck.pt.tmp").exists()                         # and no half-written temp file is left
    assert common.load_checkpoint(path, "thing")["step"] == 1
    with pytest.raises(common.UserError, match="holds a thing"):
        common.load_checkpoint(path, "teacher")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="corrupt"):
        common.load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match="no such"):
        common.load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(common.UserError, match="do not match"):
        common.load_state(torch.nn.Linear(3, 3), torch.nn.Linear(2, 2).state_dict(), path)


def test_save_grid(tmp_path):
    common.save_grid(torch.rand(5, 3, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=3)
    im = Image.open(tmp_path / "g.png")
    assert im.size == (3 * 10 + 2, 2 * 10 + 2)


# --- The shared teacher ----------------------------------------------------------------------

def test_edm_loss_is_eq2_with_table1s_noise_distribution_and_weight():
    """EDM Eq. 2 with Table 1's training choices ("Ours"), computed here in numpy float64: ln sigma ~ N(P_mean, P_std^2)
    with P_mean = -1.2, P_std = 1.2; n ~ N(0, sigma^2 I); lambda(sigma) = (sigma^2 + sigma_data^2)/(sigma*sigma_data)^2
    with sigma_data = 0.5; the loss is the mean of lambda*|D(y + n, sigma) - y|^2. Draws: B normals, then the noise."""
    seen = []

    def D(x, sigma):                                   # any denoiser; records what it is called with
        seen.append((x.double().numpy(), sigma.double().flatten().numpy()))
        return 0.7 * torch.tanh(x) + 0.1 * torch.log(sigma)

    y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = common.edm_loss(D, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    r, noise = torch.randn(6, generator=g).double().numpy(), torch.randn(y.shape, generator=g).double().numpy()
    sigma = np.exp(-1.2 + 1.2 * r)                                             # Table 1: P_mean, P_std
    lam = (sigma**2 + 0.5**2) / (sigma * 0.5) ** 2                              # Table 1: lambda(sigma), sigma_data
    y64 = y.double().numpy()
    x = y64 + sigma[:, None, None, None] * noise
    D_x = 0.7 * np.tanh(x) + 0.1 * np.log(sigma)[:, None, None, None]
    ref = (lam[:, None, None, None] * (D_x - y64) ** 2).mean()
    assert np.allclose(seen[0][0], x, rtol=1e-5, atol=1e-5) and np.allclose(seen[0][1], sigma, rtol=1e-5)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert sigma.min() < 0.3 < 1.0 < sigma.max()                                # the draws span both sides of sigma_data
    # The noise distribution over many draws: mean and std of ln sigma.
    big = torch.zeros(20_000, 1, 1, 1)
    logs = []
    common.edm_loss(lambda x, s: logs.append(s.log()) or x, big, torch.Generator().manual_seed(2))
    assert logs[0].mean().item() == pytest.approx(-1.2, abs=0.03) and logs[0].std().item() == pytest.approx(1.2, rel=0.02)


# (key, value, EDM's CIFAR-10 recipe as TEACHER_PRESETS cites it: arXiv:2206.00364 Table 7 / App. F.1 and training.py)
TEACHER_PAPER = [("images", 200_000_000, "200 Mimg"), ("batch", 512, "batch 512"), ("lr", 1e-3, "lr 1e-3"),
                 ("warmup", 10_000_000, "lr ramp-up 10 Mimg"), ("ema", 500_000, "EMA half-life 0.5 Mimg")]


@pytest.mark.parametrize("key,value,source", TEACHER_PAPER)
def test_teacher_paper_preset_values(key, value, source):
    assert common.TEACHER_PRESETS["paper"][key] == value, source


def test_warmup_lr_and_ema_values():
    """EDM's lr ramp counted in images after the step, and the EMA decay of a half-life in images."""
    ramp = common.warmup_lr(100, 10)
    assert [ramp(1.0, done, 1000) for done in (0, 40, 89, 90, 500)] == pytest.approx([0.1, 0.5, 0.99, 1.0, 1.0])
    assert common.warmup_lr(0, 10)(2.0, 0, 1000) == 2.0 and common.constant_lr(3.0, 5, 10) == 3.0
    assert common.warmup_lr(0, 1)(2.0, 0, 1000) == 2.0                         # no warm-up: the full lr from the first image
    assert common.ema_beta(32, 64) == pytest.approx(0.5**0.5) and common.ema_beta(10, 10) == pytest.approx(0.5)
    assert common.ema_beta(64, 0) == 0.0 and common.ema_beta(1, 0.5) == pytest.approx(0.25)   # no EMA; under an image


def test_train_teacher_builds_edms_recipe(fashion_dir, tmp_path, monkeypatch):
    """What train_teacher hands the loop (MainSpy): Adam (lr, betas 0.9/0.999, eps 1e-8), the preset's U-Net in train
    mode, the EDM loss, warm-up, clipping, the EMA at the preset's half-life; teacher.pt holds the EMA, not the net."""
    spy = MainSpy(monkeypatch)
    monkeypatch.setattr(common, "sample_dpmpp", lambda D, x, sigmas: x.clamp(-1, 1))      # its samples.png: not under test
    path = common.train_teacher("fashion", "smoke", tmp_path / "t", fashion_dir)
    (loop,) = spy.loops
    cfg, opt, D = common.TEACHER_PRESETS["smoke"], loop["opt"], loop["student"]
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.Adam and (group["lr"], group["betas"], group["eps"]) == (cfg["lr"], (0.9, 0.999), 1e-8)
    assert {k: v for k, v in D.net.config.items() if k in common.NET_CONFIGS["smoke"]} == common.NET_CONFIGS["smoke"]
    assert loop["training"]["net"] and loop["nets"]["net"] is D.net
    b = loop["budget"]
    assert (b.total, b.unit, b.batch, b.lr, b.clip) == (cfg["images"], "images", cfg["batch"], cfg["lr"], 1.0)
    assert b.schedule(1.0, 0, 512) == pytest.approx(cfg["batch"] / cfg["warmup"])
    ((ema, model, beta),) = loop["emas"]
    assert model is D.net and ema is loop["nets"]["ema"] and beta == pytest.approx(0.5 ** (cfg["batch"] / cfg["ema"]))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert loop["loss"](D, None, x, torch.Generator().manual_seed(3)) == common.edm_loss(D, x, torch.Generator().manual_seed(3))
    saved = common.load_checkpoint(path, "teacher")["ema"]
    assert all(torch.equal(saved[k], v) for k, v in ema.state_dict().items())
    assert any(not torch.equal(saved[k], v) for k, v in D.net.state_dict().items())

def test_teacher_resume_continues_exactly(fashion_dir, tmp_path):
    straight = common.train_teacher("fashion", "smoke", tmp_path / "a", fashion_dir, images=128)
    common.train_teacher("fashion", "smoke", tmp_path / "b", fashion_dir, images=64)
    assert common.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["images"] == 64
    resumed = common.train_teacher("fashion", "smoke", tmp_path / "b", fashion_dir, images=128, resume=True)
    a, b = common.load_checkpoint(straight)["ema"], common.load_checkpoint(resumed)["ema"]
    assert common.load_checkpoint(resumed)["images"] == 128
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must equal an uninterrupted one"
    assert (tmp_path / "a" / "samples.png").exists()


def test_load_teacher_trains_when_missing(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = common.common_parser("t").parse_args(["--preset", "smoke", "--data-dir", str(fashion_dir)])
    monkeypatch.setitem(common.TEACHER_PRESETS, "smoke", {**common.TEACHER_PRESETS["smoke"], "images": 64})
    D, path = common.load_teacher(common.Eval.of(args))
    assert path == common.RUNS / "fashion" / "teacher-smoke" / "teacher.pt" and path.exists()
    assert not any(p.requires_grad for p in D.parameters())
    args.teacher = str(tmp_path / "nothing.pt")
    with pytest.raises(common.UserError):
        common.load_teacher(common.Eval.of(args))


def test_cli_bad_input_is_one_line(tmp_path):
    r = run_script("common.py", "teacher", "--dataset", "nope", "--preset", "smoke", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown dataset" in r.stderr


@pytest.mark.parametrize("name", ["common", "fid", "sfd", "pd", "cd", "sfddm", "cfd", "sferd"])
def test_help_prints_the_headers_first_paragraph(name, monkeypatch, capsys):
    """--help describes a script by its docstring's first paragraph; the rest of the header is for the reader of the file."""
    mod = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        mod.parse_args() if hasattr(mod, "parse_args") else mod.main()
    out = " ".join(capsys.readouterr().out.split())
    head, rest = mod.__doc__.split("\n\n", 1)
    assert e.value.code == 0 and " ".join(head.split()) in out
    assert " ".join(rest.split("\n\n")[0].split()) not in out


def test_torchrun_two_processes_stay_in_sync(fashion_dir, tmp_path):
    r = run_script("common.py", "teacher", "--preset", "smoke", "--data-dir", fashion_dir, "--images", 128,
                   "--out", tmp_path / "t", cwd=tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout + r.stderr and "ranks in sync" in r.stdout + r.stderr
    assert common.load_checkpoint(tmp_path / "t" / "teacher.pt", "teacher")["images"] == 128


def test_report_measures_rms_to_the_teachers_reference(smoke_teacher, fashion_dir, tmp_path, monkeypatch):
    """A 'student' that is the teacher's own 35-NFE DPM-Solver++(3M) has teacher_rms = 0; the
    teacher's 2-NFE Euler does not; the cached baselines are reused."""
    monkeypatch.chdir(tmp_path)
    args = common.common_parser("t").parse_args(["--preset", "smoke", "--data-dir", str(fashion_dir),
                                                 "--teacher", str(smoke_teacher)])
    pg = common.Dist("cpu")
    D, path = common.load_teacher(common.Eval.of(args), pg)
    ref = common.teacher_sigmas("dpm3m", fid.REFERENCE_NFE)
    same = lambda eps: common.sample_dpmpp(D, eps * 80.0, ref)
    info = dict(method="teacher", nfe=2, train_seconds=0, images_seen=0)
    m = fid.report(common.Eval.of(args), pg, tmp_path / "run", D, path, same, info, (1, 32, 32))
    assert m["teacher_rms"] == 0 and m["fid"] is None and m["fid_n"] == 0 and m["rms_n"] == 64
    assert m["teacher_rms_euler"] > 0.01 and m["teacher_rms_dpm3m"] > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["teacher_rms_euler"] == m["teacher_rms_euler"]
    assert (tmp_path / "run" / "samples.png").exists()
    assert (path.parent / "eval" / "euler-nfe2-to0.002-n64.pt").exists()


def test_teacher_rows_for_the_results_table(smoke_teacher, fashion_dir, tmp_path):
    """`fid.py --rows`: one metrics.json per solver and NFE it can spend; the 35-NFE DPM-Solver++(3M)
    row is the reference itself (teacher_rms 0), fewer calls are further from it, and fid.py's
    table printer lists the rows."""
    r = run_script("fid.py", "--rows", "fashion", "--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher,
                   "--nfe", "1", "2", "3", "35", "--solvers", "euler", "heun", "dpm3m", "--out", tmp_path / "rows",
                   "--fid-samples", "0", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    found = sorted(p.parent.name for p in (tmp_path / "rows").rglob("metrics.json"))
    assert found == ["dpm3m-nfe2", "dpm3m-nfe3", "dpm3m-nfe35", "euler-nfe1", "euler-nfe2", "euler-nfe3",
                     "euler-nfe35", "heun-nfe3", "heun-nfe35"]          # no even-NFE Heun, no 1-NFE duplicates
    rms = {name: json.loads((tmp_path / "rows" / name / "metrics.json").read_text())["teacher_rms"] for name in found}
    assert rms["dpm3m-nfe35"] == 0 and rms["euler-nfe1"] > rms["euler-nfe3"] > rms["euler-nfe35"] > 0
    assert "| teacher-heun | 3 |" in fid.results_table(tmp_path / "rows")


# --- Pictures (issue 33): one small Pillow plotting function -------------------------------------------------

def test_nice_ticks():
    assert common.nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert common.nice_ticks(0.013, 0.049) == pytest.approx([0.02, 0.03, 0.04])
    assert common.nice_ticks(0.01, 1, log=True) == pytest.approx([0.01, 0.1, 1])              # two decades: powers
    assert common.nice_ticks(0.02, 0.9, log=True) == pytest.approx([0.02, 0.05, 0.1, 0.2, 0.5])  # fewer: 1, 2, 5
    assert common.nice_ticks(60, 300, log=True) == [100, 150, 200, 250, 300]                   # < a decade: linear


def test_plot_lines_draws_every_series_in_its_colour(tmp_path):
    from PIL import Image
    path = common.plot_lines({"a": [(1, 3.0), (2, 2.0), (4, 1.0)], "b": [(1, 5.0), (4, 4.0)]}, tmp_path / "p.png",
                             "title", "NFE", "FID", log_y=True, marks={2: "stage"})
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (400, 640, 3)
    for colour in common.PALETTE[:2]:
        assert (img == colour).all(-1).sum() > 100, colour         # lines, points and the legend's swatch
    assert not (img == common.PALETTE[2]).all(-1).any()
    with pytest.raises(ValueError):
        common.plot_lines({"a": [(1, float("nan"))]}, tmp_path / "q.png")


def test_no_file_cites_what_users_do_not_have():
    """The repository cites papers (arXiv id, section, equation) and the authors' code (repository, path): never the
    developers' private reading material, which a reader of the repository does not have."""
    root = pathlib.Path(__file__).resolve().parents[1]
    files = [p for p in [*root.glob("*.py"), root / "README.md", *root.glob("tests/**/*.py"), *root.glob("tests/**/*.md")]
             if p.is_file()]
    private = [w.replace("~", "") for w in ("../~shared", "METHODS~.md", "FID~.md", "STYLE~.md", "/~work/")]   # (~: not here)
    found = [f"{p.relative_to(root)}: {word}" for p in files for word in private if word in p.read_text()]
    assert found == [] and len(files) > 20, found
