"""Tests of sferd.py: the attention-guided teacher (blur, attention map, mask, Alg. 1 lines 8-13), the
semantic gradient predictor (zero init, loss scale of Alg. 1 line 18 at the teacher's step, Alg. 2's sampling
against hand-written loops, exact resume of the predictor phase), the latent DDPM, and the CLI (--nfe
validation, smoke runs on PD and CD, --resume and its refusal of changed settings, torchrun)."""
import argparse
import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

import cd
import common
import pd
import sferd
from conftest import MainSpy, check_run_pictures, run_script

torch.set_num_threads(2)


def smoke_denoiser(seed=0):
    """A smoke-sized U-Net with random (non-zero) output and attention weights, as a Denoiser."""
    torch.manual_seed(seed)
    net = common.UNet(in_ch=1, res=32, **common.NET_CONFIGS["smoke"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.2)
    return common.Denoiser(net).eval().requires_grad_(False)


def guided(D, **kw):
    """sferd.guided with the CLI's defaults (k 1, w 0.3, blur sigma 3 of size 15, the default attention block, x0 space)."""
    opts = dict(no_guidance=False, attn_block=None, k=1.0, w=0.3, blur_sigma=3.0, blur_size=15, guidance_space="x0")
    return sferd.guided(D, argparse.Namespace(**{**opts, **kw}))


def line18_inputs(monkeypatch):
    """Records what Alg. 1's line 18 (sferd.predictor_loss) receives: (G, x0_target, x0_student, alpha_p, s_p, weight)."""
    seen, real = [], sferd.predictor_loss
    monkeypatch.setattr(sferd, "predictor_loss", lambda *a: seen.append(a) or real(*a))
    return seen


def cosine(t):
    """alpha_t, s_t of the cosine schedule, written out independently (lmin = -2 ln 80, lmax = 20: pd.py's)."""
    b = math.atan(math.exp(-10))
    a = math.atan(80.0) - b
    logsnr = -2 * math.log(math.tan(a * t + b))
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))


# --- Attention guidance (Alg. 1 lines 8-13) ---------------------------------------------------

@pytest.mark.parametrize("sigma,size", [(1.0, 7), (3.0, 15), (5.0, 15)])
def test_blur_kernel_sums_to_one_and_preserves_constant_image(sigma, size):
    g = sferd.gaussian_kernel(sigma, size)
    assert abs(g.sum().item() - 1) < 1e-6
    x = torch.arange(size) - size // 2
    ref = torch.exp(-x.double()**2 / (2 * sigma**2))
    assert torch.allclose(g.double(), ref / ref.sum(), atol=1e-7)
    const = torch.full((2, 3, 32, 32), 0.37)
    assert torch.allclose(sferd.gaussian_blur(const, sigma, size), const, atol=1e-6)


def test_blur_is_the_2d_gaussian_and_reflects_at_borders():
    x = torch.randn(1, 2, 32, 32)
    out = sferd.gaussian_blur(x, 3.0, 15)
    xr = torch.nn.functional.pad(x, (7, 7, 7, 7), mode="reflect")   # independent: the full 2-D kernel
    k = torch.exp(-(torch.arange(15) - 7.0) ** 2 / 18)
    k2 = torch.outer(k, k) / torch.outer(k, k).sum()
    ref = torch.nn.functional.conv2d(xr, k2.expand(2, 1, 15, 15), groups=2)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_is_summed_over_queries_and_averaged_over_heads(heads):
    """A = mean over heads, sum over queries (mean 1 over keys, so k = 1 marks the keys that receive more than the
    average attention); with two heads a sum over heads would have mean 2."""
    torch.manual_seed(0)
    net = common.UNet(in_ch=1, res=32, **dict(common.NET_CONFIGS["smoke"], heads=heads))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.2)
    D = common.Denoiser(net).eval().requires_grad_(False)
    x = torch.randn(3, 1, 32, 32)
    _, extras = D(x, torch.tensor([0.5, 2.0, 10.0]), attn="dec16.1")
    attn = extras["attn"]                                          # B x heads x queries x keys
    assert attn.shape[1] == heads
    ref = torch.stack([sum(attn[b, :, q, :].mean(0) for q in range(attn.shape[2])) for b in range(3)])
    assert ref.std() > 0.01                                        # not uniform: the threshold splits the keys
    psi = sferd.attention_mask(attn, 1.0, (16, 16))
    assert torch.equal(psi.flatten(1), (ref > 1.0).float()) and 0 < psi.mean() < 1
    if heads == 2:                                                 # a sum over heads (mean 2) gives another mask
        assert not torch.equal(psi.flatten(1), (2 * ref > 1.0).float())


def test_mask_is_binary_thresholded_and_nearest_upsampled():
    torch.manual_seed(1)
    attn = torch.randn(2, 2, 16, 16).softmax(-1)                   # 4 x 4 positions, 2 heads
    psi = sferd.attention_mask(attn, 1.0, (32, 32))
    assert psi.shape == (2, 1, 32, 32) and set(psi.unique().tolist()) <= {0.0, 1.0}
    A = attn.mean(1).sum(1).reshape(2, 4, 4)
    small = (A > 1.0).float()
    ref = small.repeat_interleave(8, 1).repeat_interleave(8, 2)    # nearest: every 8 x 8 cell constant
    assert torch.equal(psi[:, 0], ref)
    assert 0 < psi.mean() < 1
    assert torch.equal(sferd.attention_mask(attn, 1e9, (32, 32)), torch.zeros(2, 1, 32, 32))
    uniform = torch.full((1, 2, 16, 16), 1 / 16)                   # every key gets exactly A = 1: not above k = 1
    assert torch.equal(sferd.attention_mask(uniform, 1.0, (4, 4)), torch.zeros(1, 1, 4, 4))


def test_default_attention_block_is_highest_resolution_decoder():
    D = smoke_denoiser()
    assert D.net.attn_names == ["enc16.0", "mid16", "dec16.0", "dec16.1"]
    assert sferd.attn_block(D.net) == "dec16.1" and sferd.attn_block(D.net, "enc16.0") == "enc16.0"
    with pytest.raises(common.UserError, match="--attn-block dec8.0: the teacher has no such"):
        sferd.attn_block(D.net, "dec8.0")


def test_default_attention_block_ranks_by_resolution_then_position():
    """Of decoder blocks at 8 and 16 (dec<resolution>.<index>), the default is the last one at 16, not the highest
    index at any resolution."""
    net = SimpleNamespace(attn_names=["enc16.0", "mid8", "dec8.0", "dec8.1", "dec8.2", "dec16.0", "dec16.1"])
    assert sferd.attn_block(net) == "dec16.1"
    plain = SimpleNamespace(attn_names=["enc16.0", "mid8"])                  # no decoder attention: no default
    with pytest.raises(common.UserError, match="the default"):
        sferd.attn_block(plain)
    assert sferd.attn_block(plain, "enc16.0") == "enc16.0"                  # a named block is fine


def test_blur_defaults_are_sigma_3_and_15_taps():
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sferd.gaussian_blur(x), sferd.gaussian_blur(x, 3.0, 15))
    assert not torch.equal(sferd.gaussian_blur(x), sferd.gaussian_blur(x, 2.0, 15))


def test_the_student_without_a_predictor_samples_with_its_bases_sampler(monkeypatch):
    """make_sampler with no G: PD's DDIM over --nfe steps for --base pd, CD's multistep sampler at --taus for cd."""
    monkeypatch.setattr(cd, "make_sampler", lambda f, taus: ("cd sampler", f, taus))
    monkeypatch.setattr(pd, "sample_ddim", lambda D, eps, N: ("pd sampler", D, N))
    student = object()
    assert sferd.make_sampler(SimpleNamespace(base="cd", taus=[1.0], nfe=2), student) == ("cd sampler", student, [1.0])
    assert sferd.make_sampler(SimpleNamespace(base="pd", taus=None, nfe=2), student)(None) == ("pd sampler", student, 2)


def test_the_student_with_a_predictor_samples_with_its_bases_alg2(monkeypatch):
    """make_sampler with G: Alg. 2 on PD's grid (speed n of the last stage) for --base pd, on CD's sampler for cd."""
    monkeypatch.setattr(sferd, "sample_latent", lambda *a: "z_sem")
    monkeypatch.setattr(sferd, "sample_sferd_pd", lambda *a: ("pd", *a[2:]))
    monkeypatch.setattr(sferd, "sample_sferd_cd", lambda *a: ("cd", *a[2:]))
    latent = SimpleNamespace(mean=0.0, std=1.0)
    args = SimpleNamespace(base="pd", nfe=2, speeds={2: 4}, taus=[1.0], N=18, z_dim=8, latent_steps=5, g_scale="train",
                           g_drop=0.3)
    eps = torch.zeros(1, 1, 4, 4)
    assert sferd.make_sampler(args, None, "G", latent)(eps) == ("pd", 2, "G", "z_sem", "train", 0.3, 4)
    args.base = "cd"
    assert sferd.make_sampler(args, None, "G", latent)(eps) == ("cd", [1.0], "G", "z_sem", 18, "train", 0.3)


def test_corrected_denoiser_corrects_every_call_by_default(monkeypatch):
    """g_drop = 0 by default: each call i is corrected with t-1 = sigma_prevs[i] ('train' scale); g_drop = 0.5 leaves
    the last half of the calls to D alone."""
    monkeypatch.setattr(sferd, "corrected_x0", lambda x0, g, sigma, sigma_prev, mode: (mode, sigma_prev.flatten()[0].item()))
    D = lambda x, sigma: "plain"
    D.net = None
    G = lambda net, x, sigma, z: None
    x = torch.zeros(1, 1, 2, 2)
    D_tilde = sferd.corrected_denoiser(D, G, None, [4.0, 2.0, 1.0, 0.5])
    assert [D_tilde(x, 1.0) for _ in range(4)] == [("train", 4.0), ("train", 2.0), ("train", 1.0), ("train", 0.5)]
    D_tilde = sferd.corrected_denoiser(D, G, None, [4.0, 2.0, 1.0, 0.5], "paper", g_drop=0.5)
    assert [D_tilde(x, 1.0) for _ in range(4)] == [("paper", 4.0), ("paper", 2.0), "plain", "plain"]


def test_guidance_strength_is_the_papers_except_in_the_lab_preset():
    """w = 0.3 (Eq. 11) in the paper and smoke presets; the lab preset's 0.1 is a documented deviation; --w wins."""
    assert [sferd.parse_args(["--preset", p]).w for p in ("paper", "lab", "smoke")] == [0.3, 0.1, 0.3]
    assert sferd.parse_args(["--preset", "lab", "--w", "0.3"]).w == 0.3


def test_w0_gives_the_plain_teacher_and_w_matches_alg1_in_vp_notation():
    D = smoke_denoiser()
    x = torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.7, 3.0])
    assert torch.allclose(guided(D, w=0.0)(x, sigma), D(x, sigma), atol=1e-6)
    assert guided(D, no_guidance=True) is D
    # Alg. 1 lines 8-13 written in VP notation z_t = alpha*x0 + s*eps (independent of the EDM-view wrapper).
    w, k = 0.3, 1.0
    alpha, s = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    alpha, s = alpha.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    z_t = alpha * x
    x0_hat, eps_hat, _, ext = common.vp_predict(D, z_t, alpha, s, attn="dec16.1")
    A = ext["attn"].mean(1).sum(1).reshape(2, 1, 16, 16)
    psi = (A > k).float().repeat_interleave(2, 2).repeat_interleave(2, 3)
    z_tilde = alpha * sferd.gaussian_blur(x0_hat, 3.0, 15) + s * eps_hat               # line 11
    z_attn = (1 - psi) * z_t + psi * z_tilde                                           # line 12
    x0_attn = common.vp_predict(D, z_attn, alpha, s)[0]
    ref = (1 + w) * x0_hat - w * x0_attn                                               # line 13
    out = common.vp_predict(guided(D, k=k, w=w), z_t, alpha, s)[0]
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out - x0_hat).abs().max() > 1e-3                                           # guidance does something


def test_eps_space_guidance_is_the_authors_and_differs_by_the_sharpening_term():
    """--guidance-space eps, the authors' distill_losses_enc in VP notation: eps_attn of the re-noised blurred image,
    eps~ = eps_attn + (1 + w)*(eps_hat - eps_attn) (their uncond + w_guide*(pred - uncond) at w_guide = 1 + w), x0 =
    (z - s*eps~)/alpha. Substituting z_attn - z = alpha*psi*(B(x0_hat) - x0_hat) gives Eq. 11's x0 minus
    w*psi*(x0_hat - B(x0_hat)): the x0 form sharpens where psi = 1 by that much more."""
    D, w = smoke_denoiser(), 0.3
    x, sigma = torch.randn(2, 1, 32, 32) * 2, torch.tensor([0.7, 3.0])
    alpha, s = (1 / (1 + sigma**2).sqrt()).view(-1, 1, 1, 1), (sigma / (1 + sigma**2).sqrt()).view(-1, 1, 1, 1)
    z_t = alpha * x
    x0_hat, eps_hat, _, ext = common.vp_predict(D, z_t, alpha, s, attn="dec16.1")
    psi = (ext["attn"].mean(1).sum(1).reshape(2, 1, 16, 16) > 1.0).float().repeat_interleave(2, 2).repeat_interleave(2, 3)
    blurred = sferd.gaussian_blur(x0_hat, 3.0, 15)
    z_attn = alpha * ((1 - psi) * x0_hat + psi * blurred) + s * eps_hat                 # their q_sample(mask_blurred, eps)
    eps_attn = common.vp_predict(D, z_attn, alpha, s)[1]
    eps_tilde = eps_attn + (1 + w) * (eps_hat - eps_attn)
    ref = (z_t - s * eps_tilde) / alpha                                                 # pred_x0_from_eps
    out_eps = common.vp_predict(guided(D, w=w, guidance_space="eps"), z_t, alpha, s)[0]
    out_x0 = common.vp_predict(guided(D, w=w), z_t, alpha, s)[0]
    assert torch.allclose(out_eps, ref, atol=1e-4)
    term = w * psi * (x0_hat - blurred)
    assert torch.allclose(out_x0 - out_eps, term, atol=1e-4) and term.abs().max() > 1e-2 and 0 < psi.mean() < 1
    assert sferd.parse_args([]).guidance_space == "x0"                                  # Eq. 11 by default


# --- Semantic gradient predictor (Sec. 4.2, Alg. 1 line 18, Alg. 2) ----------------------------

def test_zero_init_predictor_leaves_the_student_unchanged():
    D = smoke_denoiser()
    G = sferd.GradientPredictor(D.net, z_dim=8)
    z_sem = torch.randn(4, 8)
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(G(D.net, x, 2.0, z_sem), torch.zeros_like(x))
    eps = torch.randn(4, 1, 32, 32)
    assert torch.allclose(sferd.sample_sferd_pd(D, eps, 4, G, z_sem), pd.sample_ddim(D, eps, 4), atol=1e-6)
    assert not any(p.data_ptr() == q.data_ptr() for p in G.parameters() for q in D.net.parameters())
    with torch.no_grad():                                          # it does depend on z_sem once trained
        G.body.conv_out.weight.normal_()
        for m in G.body.modules():
            if isinstance(m, common.ResBlock) and m.cond is not None:
                m.cond.weight.normal_()
    assert (G(D.net, x, 2.0, z_sem) - G(D.net, x, 2.0, -z_sem)).abs().max() > 1e-3


def nonzero_predictor(D, z_dim=8, seed=3):
    """G_tau on D's encoder with random (non-zero) output and z_sem maps, as after training."""
    G = sferd.GradientPredictor(D.net, z_dim)
    torch.manual_seed(seed)
    with torch.no_grad():
        G.body.conv_out.weight.normal_(std=0.3)
        for m in G.body.modules():
            if isinstance(m, common.ResBlock) and m.cond is not None:
                m.cond.weight.normal_()
    return G.eval().requires_grad_(False)


def test_loss_scale_is_s_prev_squared_over_alpha_prev():
    N, t = 4, 0.75
    a_p, s_p = cosine(t - 0.5 / N)                                 # t-1: the teacher's step (Alg. 1 line 15)
    alpha_p, sigma_p = pd.alpha_sigma(torch.tensor([t - 0.5 / N], dtype=torch.float64), torch.zeros(1))
    torch.manual_seed(0)
    G, x0_t, x0_s = torch.randn(3, 2, 1, 32, 32).unbind(0)
    weight = torch.tensor([2.0, 1.0])
    scale = s_p**2 / a_p
    ref = (weight * ((scale * G - (x0_t - x0_s)) ** 2).mean(dim=(1, 2, 3))).mean()
    loss = sferd.predictor_loss(G, x0_t, x0_s, alpha_p, sigma_p, weight)
    assert abs(loss.item() - ref.item()) < 1e-5
    perfect = (x0_t - x0_s) / scale                                # the minimiser: scale*G = residual
    assert sferd.predictor_loss(perfect, x0_t, x0_s, alpha_p, sigma_p, weight).item() < 1e-8


def test_alg1_pd_scale_is_at_the_teachers_step_and_nonzero_on_the_last_student_step(monkeypatch):
    """Alg. 1 line 15: x~_{t-1} = g(x_t, x0_teacher) is the teacher's step, t' = t - 0.5/N for PD; with the
    student's t - 1/N the scale s^2/alpha would be ~0 on the last step (t = 1/N) and G would learn nothing there.
    alg1_pd draws i, then eps; G sees x_t = z_t/alpha_t at sigma = s_t/alpha_t, E sees x0."""
    D, seen, inputs = smoke_denoiser(), line18_inputs(monkeypatch), []
    x0 = torch.rand(16, 1, 32, 32) * 2 - 1
    E = lambda x: inputs.append(("E", x)) or torch.zeros(len(x), 8)
    G = lambda net, x, sigma, z: inputs.append(("G", x, sigma)) or torch.zeros_like(x)
    for N in (1, 4):
        g = torch.Generator().manual_seed(0)
        i, eps = torch.randint(N, (16,), generator=g), torch.randn(x0.shape, generator=g)
        sferd.alg1_pd(D, D, x0, torch.Generator().manual_seed(0), E, G, N)
        _, _, x0_student, alpha_p, s_p, w = seen[-1]
        (_, x_E), (_, x_G, sigma) = inputs[-2:]
        assert torch.equal(x_E, x0)
        with torch.no_grad():                                      # the student's x0_hat (not its eps or v) at x_t
            assert torch.allclose(x0_student, D(x_G, sigma), atol=1e-5)
        for b in range(16):
            a_t, s_t = cosine((i[b].item() + 1) / N)
            a_ref, s_ref = cosine((i[b].item() + 0.5) / N)
            assert abs(sigma[b].item() - s_t / a_t) < 1e-4 * s_t / a_t
            assert torch.allclose(x_G[b], (a_t * x0[b] + s_t * eps[b]) / a_t, atol=1e-4 * max(1, s_t / a_t))
            assert abs(alpha_p[b].item() - a_ref) < 1e-6 and abs(s_p[b].item() - s_ref) < 1e-6
            assert abs(w[b].item() - max(a_t**2 / s_t**2, 1.0)) < 1e-4 * max(1, a_t**2 / s_t**2)
        last = (i == 0)
        assert last.any()
        scale = (s_p**2 / alpha_p).flatten()[last]
        assert (scale > 0.03).all()                                # N = 4: 0.039 at t' = 1/8; N = 1: 0.71
        x0_t, x0_s = torch.randn(2, 1, 1, 8, 8).unbind(0)
        G_ = torch.randn(1, 1, 8, 8, requires_grad=True)
        sferd.predictor_loss(G_, x0_t, x0_s, alpha_p[last][:1], s_p[last][:1], torch.ones(1)).backward()
        assert G_.grad.abs().max() > 1e-4                          # G is trained there (t - 1/N: ~1e-10)


def test_sampling_correction_is_alg2():
    torch.manual_seed(0)
    x0, G, eps_theta = torch.randn(3, 2, 1, 8, 8).unbind(0)
    (a_t, s_t), (a_p, s_p) = cosine(0.5), cosine(0.25)
    z_t = a_t * x0 + s_t * eps_theta                               # the student's x0 and eps agree on z_t
    sig, sig_p = torch.tensor(s_t / a_t).view(1, 1, 1, 1), torch.tensor(s_p / a_p).view(1, 1, 1, 1)
    eps_tilde = eps_theta - s_t * G                                # Alg. 2, line 1 of the loop
    ref = (z_t - s_t * eps_tilde) / a_t
    assert torch.allclose(sferd.corrected_x0(x0, G, sig, sig_p, "paper"), ref, atol=1e-5)
    ref_train = x0 + s_p**2 / a_p * G                              # 'train': the scale of Alg. 1 line 18
    assert torch.allclose(sferd.corrected_x0(x0, G, sig, sig_p, "train"), ref_train, atol=1e-5)


@pytest.mark.parametrize("mode,g_drop,steps", [("train", 0.0, 4), ("paper", 0.0, 4), ("train", 0.3, 3), ("train", 0.5, 2)])
def test_sample_sferd_pd_is_a_hand_written_alg2_loop(mode, g_drop, steps):
    """Alg. 2 on PD's N-step grid, by hand: x0~ = (z - s_t*eps~)/alpha_t = x0 + (s_t/alpha_t)*c_t*G (c_t = s_t for
    'paper'; 'train': the scale of line 18 at t-1 = t - 0.5/N), clipped, then the DDIM step from the clipped x0~;
    G only on the first round((1 - g_drop)*N) steps; the last step returns x0~."""
    D = smoke_denoiser()
    G, N = nonzero_predictor(D), 4
    z_sem, eps = torch.randn(2, 8), torch.randn(2, 1, 32, 32)
    z, clipped = eps, False
    for j, k in enumerate(range(N, 0, -1)):
        a_t, s_t = cosine(k / N)
        x0 = D(z / a_t, s_t / a_t)
        if j < steps:
            a_p, s_p = cosine((k - 0.5) / N)
            x0 = x0 + (s_t**2 / a_t if mode == "paper" else s_p**2 / a_p) * G(D.net, z / a_t, s_t / a_t, z_sem)
        clipped |= bool((x0.abs() > 1).any())
        x0 = x0.clamp(-1, 1)
        if k > 1:
            a_s, s_s = cosine((k - 1) / N)
            z = a_s * x0 + s_s * (z - a_t * x0) / s_t                 # mu_{t-1}*x0~ + s_{t-1}*eps(x0~)
    out = sferd.sample_sferd_pd(D, eps, N, G, z_sem, mode, g_drop)
    assert clipped and torch.allclose(out, x0, atol=1e-4)
    if (mode, g_drop) == ("train", 0.0):                           # the defaults
        assert torch.equal(sferd.sample_sferd_pd(D, eps, N, G, z_sem), out)
    assert (out - pd.sample_ddim(D, eps, N)).abs().max() > 1e-2    # the correction does something


@pytest.mark.parametrize("mode,g_drop,steps", [("train", 0.0, 4), ("paper", 0.0, 4), ("train", 0.3, 3)])
def test_sample_sferd_cd_is_a_hand_written_alg2_loop(mode, g_drop, steps):
    """Alg. 2 on CD's multistep sampler, by hand: at 80 and at the taus (18-point grid indices 10, 12, 14) t-1 is
    the next grid point (1, 11, 13, 15), as in training (alg1_cd's t2); no clipping inside the sampler."""
    D = smoke_denoiser()
    f, G = cd.ConsistencyFunction(D.net), nonzero_predictor(D)
    z_sem, eps = torch.randn(2, 8), torch.randn(2, 1, 32, 32)
    grid = common.karras_sigmas(18, cd.SIGMA_MIN, cd.SIGMA_MAX, cd.RHO).tolist()
    taus, noise = [grid[i] for i in (10, 12, 14)], cd.renoise_source(eps).randn_like
    x = cd.SIGMA_MAX * eps
    for j, (sigma, prev) in enumerate(zip([cd.SIGMA_MAX, *taus], (1, 11, 13, 15))):
        if j:
            x = x + math.sqrt(sigma**2 - cd.SIGMA_MIN**2) * noise(x)
        x0 = f(x, sigma)
        if j < steps:
            a_t, s_t = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
            a_p, s_p = 1 / math.sqrt(1 + grid[prev]**2), grid[prev] / math.sqrt(1 + grid[prev]**2)
            x0 = x0 + (s_t**2 / a_t if mode == "paper" else s_p**2 / a_p) * G(D.net, x, sigma, z_sem)
        x = x0
    out = sferd.sample_sferd_cd(f, eps, taus, G, z_sem, 18, mode, g_drop)
    assert torch.allclose(out, x, atol=1e-4 * max(1, x.abs().max().item()))
    if (mode, g_drop) == ("train", 0.0):                           # the defaults
        assert torch.equal(sferd.sample_sferd_cd(f, eps, taus, G, z_sem, 18), out)
    assert (out - cd.make_sampler(f, taus)(eps)).abs().max() > 1e-2


def test_latent_ddpm_table_and_the_zero_network_sampler():
    abar = sferd.LATENT_ALPHA_BAR                                # Table 4: constant beta 0.008, T = 1000
    assert torch.allclose(abar.double(), 0.992 ** torch.arange(1, 1001, dtype=torch.float64), rtol=1e-5, atol=0)
    mlp = sferd.LatentMLP(8, 32, 3)                             # zero-initialised output: the loss, with a
    noise = torch.randn(5, 8)                                    # non-zero network: the tests further down
    out = sferd.sample_latent(mlp, noise, 10, torch.full((8,), 2.0), torch.full((8,), 0.5), sferd.LATENT_ALPHA_BAR)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    # eps_omega = 0: each DDIM step rescales by sqrt(abar_next/abar_t), so z_0 = z_T/sqrt(abar_T), denormalised
    # (this checks the end points and the denormalisation; the steps in between: the non-zero network test below).
    assert torch.allclose(out, noise / 0.992**500 * 0.5 + 2.0, rtol=1e-4)


def test_predictor_phase_resumes_exactly_and_the_latent_ddpm_counts_its_time(tmp_path, capsys):
    args = sferd.parse_args(["--preset", "smoke", "--nfe", "2"])      # smoke: 4 predictor updates, checkpoint every 2
    pg, data, teacher = common.Dist("cpu"), torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8), smoke_denoiser(1)
    alg1 = lambda s, T, x0, gen, E, G: sferd.alg1_pd(s, T, x0, gen, E, G, 2)
    chain = dict(teacher="t", guidance=True, w=0.3)

    def run(out, alg1, resume=False, chain=chain):
        args.resume, student = resume, smoke_denoiser(0)
        E, G, totals = sferd.train_predictor(args, pg, data, student, teacher, alg1, out, chain,   # E, G init: global RNG
                                             dict(images=0, seconds=0.0))
        return E, G, student, totals

    class Interrupt(Exception):
        pass

    def counted(stop=0):
        calls = []

        def counting(*a):
            calls.append(1)
            if len(calls) == stop:
                raise Interrupt
            return alg1(*a)
        return counting, calls
    with pytest.raises(Interrupt):
        run(tmp_path / "a", counted(stop=3)[0])                    # interrupted after the checkpoint at update 2 of 4
    with pytest.raises(common.UserError, match=r"w 0.3 \(now 0.5\)"):
        run(tmp_path / "a", alg1, resume=True, chain=dict(chain, w=0.5))
    rest, calls = counted()
    E_a, G_a, student_a, totals_a = run(tmp_path / "a", rest, resume=True)
    assert len(calls) == 2 and "resuming predictor at 2 of 4 updates" in capsys.readouterr().out
    E, G, student, totals_b = run(tmp_path / "b", alg1)
    for a, b in ((E_a, E), (G_a, G), (student_a.net, student.net)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert totals_a["images"] == totals_b["images"] == 32
    init = smoke_denoiser(0).net.parameters()
    assert any(not torch.equal(p, q) for p, q in zip(student.net.parameters(), init))   # the joint phase trained it
    # B1: the latent DDPM's time is part of the training cost; a finished one is reused only for the same E_phi.
    args.resume = False
    mlp, totals = sferd.train_latent(args, pg, data, E, tmp_path / "b", chain, dict(images=0, seconds=0.0))
    ck = common.load_checkpoint(tmp_path / "b" / "latent.pt", "sferd-latent")
    assert totals["seconds"] == ck["seconds"] > 0 and ck["finished"]
    assert torch.equal(ck["ema"]["mean"], mlp.mean) and mlp.std.min() > 0 and mlp.mean.abs().max() > 0   # z_sem's
    args.resume = True
    mlp2, totals = sferd.train_latent(args, pg, data, E, tmp_path / "b", chain, dict(images=0, seconds=1.0))
    assert "resuming latent DDPM at 10 of 10 updates" in capsys.readouterr().out and totals["seconds"] == 1.0 + ck["seconds"]
    assert all(torch.equal(p, q) for p, q in zip(mlp.state_dict().values(), mlp2.state_dict().values()))
    args.pred_iters = 6                                            # another E_phi: fit again
    sferd.train_latent(args, pg, data, E, tmp_path / "b", chain, dict(images=0, seconds=0.0))
    assert "fitting the latent DDPM again" in capsys.readouterr().out


# --- Command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--nfe", "3"], ["--nfe", "8"], ["--base", "cd", "--nfe", "7"],
                                  ["--blur-size", "4"]])
def test_bad_input_is_one_line(args, capsys):
    with pytest.raises(SystemExit) as e:
        common.main_guard(lambda: sferd.parse_args(["--preset", "smoke", *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_cli_bad_nfe_exits_2(fashion_dir, smoke_teacher, tmp_path):
    r = run_script("sferd.py", "--preset", "smoke", "--nfe", "3", "--data-dir", fashion_dir, "--teacher",
                   smoke_teacher, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--nfe 3" in r.stderr


@pytest.mark.parametrize("base", ["pd", "cd"])
def test_smoke_end_to_end_and_resume(base, fashion_dir, smoke_teacher, tmp_path):
    common_args = ["--preset", "smoke", "--base", base, "--nfe", "2", "--data-dir", fashion_dir,
                   "--teacher", smoke_teacher, "--out", tmp_path / "run"]
    r = run_script("sferd.py", *common_args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (tmp_path / "run" / "samples.png").exists()
    rows = list(csv.reader(open(tmp_path / "run" / "loss.csv")))
    stages = list(dict.fromkeys(r[0] for r in rows[1:]))     # the base's stage(s), then the predictor's, the latent's
    assert stages[-2:] == ["predictor", "latent DDPM"] and stages[0] == ("CD" if base == "cd" else "sferd-pd 8 -> 4 steps")
    check_run_pictures(tmp_path / "run", stages)
    assert m["method"] == "sferd" and m["variant"] == f"sferd-{base}" and m["nfe"] == 2 and m["guidance"]
    assert m["images_seen"] > m["base_phase_images"] > 0 and math.isfinite(m["teacher_rms"])
    assert "teacher_rms_euler" in m and "base_note" in m
    assert r.stdout.strip().splitlines()[-1].startswith(f"sferd-{base} fashion NFE 2")
    r2 = run_script("sferd.py", *common_args, "--resume", cwd=tmp_path)   # everything done: nothing retrains
    assert r2.returncode == 0, r2.stderr[-3000:]
    m2 = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m2["images_seen"] == m["images_seen"] and abs(m2["teacher_rms"] - m["teacher_rms"]) < 1e-6
    reused = "resuming sferd-pd 4 -> 2 steps at 3 of 3 updates" if base == "pd" else "resuming CD at 8 of 8 updates"
    for line in (reused, "resuming predictor at 4 of 4 updates", "resuming latent DDPM at 10 of 10 updates"):
        assert line in r2.stdout, r2.stdout[-3000:]
    r3 = run_script("sferd.py", *common_args, "--resume", "--w", "0.5", cwd=tmp_path)   # other guidance: refused
    err = r3.stderr.strip().splitlines()[-1]
    assert r3.returncode == 2 and err.startswith("error:") and "w 0.3 (now 0.5)" in err, r3.stderr[-3000:]


def test_torchrun_two_processes(fashion_dir, smoke_teacher, tmp_path):
    r = run_script("sferd.py", "--preset", "smoke", "--nfe", "4", "--data-dir", fashion_dir, "--teacher",
                   smoke_teacher, "--out", tmp_path / "ddp", cwd=tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["variant"] == "sferd-pd" and m["nfe"] == 4


# --- SFERD-PD's distillation speed n and the paper's two-stage schedule (Alg. 1 lines 4-6, Table 6) ---------

def test_two_stage_schedule_is_table6_and_the_lab_keeps_halving():
    assert sferd.pd_stages(1, 1024, "two-stage") == {32: 32, 1: 32}    # {student steps: n}, in order
    assert sferd.pd_stages(2, 1024, "two-stage") == {64: 16, 2: 32}
    assert list(sferd.pd_stages(4, 16, "halving").items()) == [(8, 2), (4, 2)]
    assert sferd.pd_stages(8, 16, "two-stage") == {8: 2}               # no power of two strictly in between
    assert all(type(n) is int for n in sferd.pd_stages(1, 1024, "two-stage").values())   # n counts teacher steps
    paper, lab = (sferd.parse_args(["--preset", p, "--nfe", "1"]) for p in ("paper", "lab"))
    assert (paper.start_steps, paper.stages, paper.lr, paper.lr_schedule) == (1024, [32, 1], 2e-4, "constant")
    assert (lab.start_steps, lab.stages, lab.lr, lab.lr_schedule) == (16, [8, 4, 2, 1], 2e-4, "anneal")
    assert (paper.iters, paper.batch, lab.iters, lab.batch) == (250_000, 128, 300, 32)     # 32M images per stage (Table 6)
    assert sferd.parse_args(["--preset", "lab", "--nfe", "1", "--schedule", "two-stage"]).stages == [4, 1]


def test_each_base_stage_trains_its_n_step_target_with_its_lr_schedule(tmp_path, monkeypatch):
    """train_pd: stage k distils the guided last student with n = its speed (Table 6) under App. B.1's constant lr
    (paper) or PD's linear anneal (lab); pd.train_stage is replaced by one evaluation of the loss it is given."""
    calls, real = [], pd.pd_loss
    monkeypatch.setattr(pd, "pd_loss", lambda s, T, x, g, N, xflip=False, n=2: calls.append((N, n)) or real(s, T, x, g, N,
                                                                                                        xflip, n))

    def one_evaluation(pg, loss, budget, student, path, kind, settings, gen, reuse, resume, totals, **loop):
        calls.append((path.name, [budget.schedule(1.0, k, 10) for k in (0, 5)], budget.total))
        loss(student, loop["teacher"], common.to_float(loop["data"][:2]), gen)
        return totals

    monkeypatch.setattr(pd, "train_stage", one_evaluation)
    monkeypatch.setattr(pd, "teacher_target", lambda T, z, t, N, n=2: (z, z))            # the teacher is not under test
    data, pg = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8), common.Dist("cpu")
    for preset, expected in (("paper", [("student-32steps.pt", [1.0, 1.0], 250_000), (32, 32), ("student-1steps.pt",
                                        [1.0, 1.0], 250_000), (1, 32)]),
                             ("lab", [("student-2steps.pt", [1.0, 0.5], 300), (2, 2), ("student-1steps.pt", [1.0, 0.5],
                                      300), (1, 2)])):
        calls.clear()
        argv = ["--preset", preset, "--nfe", "1"] + (["--start-steps", "4"] if preset == "lab" else [])
        args = sferd.parse_args(argv)
        student, teacher, alg1, _ = sferd.train_pd(args, pg, data, smoke_denoiser(), tmp_path, {}, torch.Generator())
        assert calls == expected, preset


def test_cd_base_uses_the_papers_l2_and_budget_in_the_paper_preset():
    paper = sferd.parse_args(["--preset", "paper", "--base", "cd", "--nfe", "1"])
    assert (paper.metric, paper.N, paper.lr, paper.batch, paper.iters * paper.batch) == \
        ("l2", 40, 2e-4, 256, 32_000_000)                          # Sec. 6.2, App. B.1, Table 3 (32M images)
    lab = sferd.parse_args(["--preset", "lab", "--base", "cd", "--nfe", "4"])
    assert (lab.metric, lab.N, lab.iters, lab.weighting, lab.mu, lab.ema_rate, lab.lr, lab.batch) == tuple(
        cd.PRESETS["lab"][k] for k in ("metric", "N", "iterations", "weighting", "mu", "ema_rate", "lr", "batch"))   # cd.py's
    assert sferd.parse_args(["--preset", "lab", "--base", "cd", "--nfe", "4", "--iters", "7"]).iters == 7


def ddim_by_hand(D, z, t, s):
    """One DDIM step t -> s written from the cosine schedule above (s = 0: the x0 prediction)."""
    a_t, s_t = cosine(t)
    x0 = D(z / a_t, s_t / a_t)
    if s == 0:
        return x0, x0
    a_s, s_s = cosine(s)
    return x0, a_s * x0 + s_s * (z - a_t * x0) / s_t


@pytest.mark.parametrize("n", [2, 4])
def test_n_step_target_is_n_teacher_ddim_steps(n):
    """Alg. 1 line 15 n times (pd.teacher_target with n): one student DDIM step t -> t - 1/N with x~ lands where n
    teacher steps of size 1/(nN) land; n = 2 is PD's two explicit steps bit for bit; on the last student step x~ is the
    teacher's last x0."""
    D, N = smoke_denoiser(), 4
    torch.manual_seed(0)
    x0, eps = torch.rand(4, 1, 32, 32) * 2 - 1, torch.randn(4, 1, 32, 32)
    i = torch.tensor([3, 2, 1, 0])
    t = (i.double() + 1) / N
    alpha, s = pd.alpha_sigma(t, x0)
    z_t = alpha * x0 + s * eps
    x_tilde, z_end = pd.teacher_target(D, z_t, t, N, n)
    if n == 2:                                                     # PD's Alg. 2 as two written-out steps: bit for bit
        (a_t, s_t), (a_p, s_p), (a_pp, s_pp) = (pd.alpha_sigma(u, z_t) for u in (t, t - 0.5 / N, t - 1.0 / N))
        x_hat = common.vp_predict(D, z_t, a_t, s_t)[0]
        z_p = pd.ddim_step(z_t, x_hat, a_t, s_t, a_p, s_p)
        x_hat_p = common.vp_predict(D, z_p, a_p, s_p)[0]
        z_pp = pd.ddim_step(z_p, x_hat_p, a_p, s_p, a_pp, s_pp)
        ref = torch.where((t - 1.0 / N <= 0).reshape(-1, 1, 1, 1), x_hat_p,
                          (z_pp - s_pp / s_t * z_t) / (a_pp - s_pp / s_t * a_t))
        assert torch.equal(x_tilde, ref) and torch.equal(z_end, z_pp)
    for b in range(4):
        tb, z = t[b].item(), z_t[b:b + 1]
        for j in range(n):                                         # the teacher's n DDIM steps, by hand
            x0_teacher, z = ddim_by_hand(D, z, tb - j / (n * N), tb - (j + 1) / (n * N))
        assert torch.allclose(z_end[b:b + 1], z, atol=1e-3)
        if i[b] == 0:                                              # t - 1/N = 0: the teacher's last x0 prediction
            assert torch.allclose(x_tilde[b:b + 1], x0_teacher, atol=1e-3)
            continue
        student_step = lambda x, sigma: x_tilde[b:b + 1]           # a student that predicts x~ ...
        _, z_student = ddim_by_hand(student_step, z_t[b:b + 1], tb, tb - 1 / N)
        assert torch.allclose(z_student, z, atol=1e-3)             # ... lands on the teacher's point
    if n == 4:                                                     # and it differs from a 2-step target
        assert (x_tilde - pd.teacher_target(D, z_t, t, N)[0]).abs().max() > 1e-3


def test_sferd_pd_loss_uses_the_n_step_target():
    """The base phase is pd.pd_loss (its draws: eps, then i) with the n-step target."""
    D, S, N = smoke_denoiser(0), smoke_denoiser(1), 2
    torch.manual_seed(0)
    x, g = torch.rand(6, 1, 32, 32) * 2 - 1, lambda: torch.Generator().manual_seed(3)
    gen = g()
    eps, i = torch.randn(x.shape, generator=gen), torch.randint(N, (6,), generator=gen)
    assert set(i.tolist()) == {0, 1}
    t = (i.double() + 1) / N
    alpha, s = pd.alpha_sigma(t, x)
    z = alpha * x + s * eps
    x_tilde, _ = pd.teacher_target(D, z, t, N, 4)
    ref = (pd.truncated_snr_weight(alpha, s).flatten()
           * ((common.vp_predict(S, z, alpha, s)[0] - x_tilde) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(pd.pd_loss(S, D, x, g(), N, n=4), ref, rtol=1e-5)
    assert not torch.allclose(ref, pd.pd_loss(S, D, x, g(), N), rtol=1e-3)


def test_alg1_pd_and_the_sampler_put_t_minus_1_at_the_teachers_step_for_any_n(monkeypatch):
    D, x0, seen = smoke_denoiser(), torch.rand(4, 1, 32, 32) * 2 - 1, line18_inputs(monkeypatch)
    i = torch.randint(2, (4,), generator=torch.Generator().manual_seed(0))
    sferd.alg1_pd(D, D, x0, torch.Generator().manual_seed(0), lambda x: torch.zeros(len(x), 8),
                  lambda net, x, sigma, z: torch.zeros_like(x), 2, 8)
    alpha_p, s_p = seen[-1][3:5]
    for b in range(4):
        a_ref, s_ref = cosine((i[b].item() + 1) / 2 - 1 / 16)
        assert abs(alpha_p[b].item() - a_ref) < 1e-6 and abs(s_p[b].item() - s_ref) < 1e-6
    G, z_sem, eps = nonzero_predictor(D), torch.randn(2, 8), torch.randn(2, 1, 32, 32)
    seen = []
    real = sferd.corrected_x0
    try:
        sferd.corrected_x0 = lambda x0, g, sigma, sigma_prev, mode: seen.append(sigma_prev.flatten()[0].item()) or x0
        sferd.sample_sferd_pd(D, eps, 2, G, z_sem, n=8)
    finally:
        sferd.corrected_x0 = real
    assert [round(v, 3) for v in seen] == [round(s / a, 3) for a, s in (cosine(1 - 1 / 16), cosine(0.5 - 1 / 16))]


# --- Tests that fail when a line of the predictor, the latent DDPM or alg1_cd is wrong ----------------------

def nonzero_latent_mlp(z_dim=8, seed=0):
    torch.manual_seed(seed)
    mlp = sferd.LatentMLP(z_dim, 32, 3)
    with torch.no_grad():
        mlp.out.weight.normal_(std=0.5)
        mlp.out.bias.normal_(std=0.5)
    return mlp.eval()


def test_latent_noising_and_loss_with_a_nonzero_network():
    """Eq. 16 written out: z_t = sqrt(abar_t)*z + sqrt(1 - abar_t)*eps with abar_t = (1 - 0.008)^(t+1)."""
    mlp = nonzero_latent_mlp()
    torch.manual_seed(1)
    z, eps, t = torch.randn(16, 8), torch.randn(16, 8), torch.randint(1000, (16,))
    abar = (0.992 ** (t.double() + 1)).float()[:, None]
    ref = (eps - mlp(abar.sqrt() * z + (1 - abar).sqrt() * eps, t)).abs().mean()
    assert abs(sferd.latent_loss(mlp, z, t, eps, sferd.LATENT_ALPHA_BAR).item() - ref.item()) < 1e-5
    assert abs(ref.item() - eps.abs().mean().item()) > 1e-2        # the network's output matters here


def test_latent_ddim_sampler_with_a_nonzero_network():
    """DDIM (eta 0) by hand: z0 = (z - sqrt(1 - abar_t)*eps)/sqrt(abar_t), z <- sqrt(abar_next)*z0 + sqrt(1 - abar_next)*eps."""
    mlp, noise = nonzero_latent_mlp(), torch.randn(5, 8)
    mean, std = torch.full((8,), 2.0), torch.full((8,), 0.5)
    ts = [round(999 - 999 * k / 9) for k in range(10)]
    z = noise.double()
    for k, t in enumerate(ts):
        a = 0.992 ** (t + 1)
        e = mlp(z.float(), torch.full((5,), t)).double()
        z0 = (z - math.sqrt(1 - a) * e) / math.sqrt(a)
        a_next = 0.992 ** (ts[k + 1] + 1) if k + 1 < len(ts) else 1.0
        z = math.sqrt(a_next) * z0 + math.sqrt(1 - a_next) * e
    out = sferd.sample_latent(mlp, noise, 10, mean, std, sferd.LATENT_ALPHA_BAR)
    assert torch.allclose(out.double(), z * 0.5 + 2.0, rtol=1e-3, atol=1e-3)


def test_predictor_phase_one_freezes_the_student_and_encodes_x0(tmp_path, monkeypatch):
    """Sec. 4.2: the student is frozen for the first half of the updates; Alg. 1 line 17: z_sem = E_phi(x0), not x_t."""
    args = sferd.parse_args(["--preset", "smoke", "--nfe", "2"])      # 4 predictor updates: 2 frozen, 2 joint
    pg, data, teacher = common.Dist("cpu"), torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8), smoke_denoiser(1)
    seen_x0, encoded, after = [], [], []
    forward = sferd.SemanticEncoder.forward
    monkeypatch.setattr(sferd.SemanticEncoder, "forward", lambda self, x: encoded.append(x.clone()) or forward(self, x))
    student, init = smoke_denoiser(0), [p.clone() for p in smoke_denoiser(0).net.parameters()]

    def alg1(s, T, x0, gen, E, G):
        after.append([p.clone() for p in s.net.parameters()])      # the student before this update
        seen_x0.append(x0.clone())
        return sferd.alg1_pd(s, T, x0, gen, E, G, 2)
    args.resume = False
    sferd.train_predictor(args, pg, data, student, teacher, alg1, tmp_path, dict(teacher="t"), dict(images=0, seconds=0.0))
    assert len(encoded) == len(seen_x0) == 4 and all(torch.equal(e, x) for e, x in zip(encoded, seen_x0))
    for k in (1, 2):                                               # after updates 1 and 2 (the frozen phase)
        assert all(torch.equal(p, q) for p, q in zip(after[k], init)), k
    assert any(not torch.equal(p, q) for p, q in zip(student.net.parameters(), init))   # the joint phase trains it


def test_alg1_cd_pair_target_and_scale_at_t2(monkeypatch):
    """SFERD-CD: (t, t2) = (sigma_n, sigma_{n+1}), x_t = x0 + t*z, the target f(Heun step to t2, t2) without
    gradient, and line 18's scale at t-1 = t2 (not at t), lambda = 1; G sees x_t at t, E sees x0."""
    D, seen, inputs = smoke_denoiser(), line18_inputs(monkeypatch), []
    f = cd.ConsistencyFunction(smoke_denoiser(2).net.requires_grad_(True))      # trainable, as in the joint phase
    sigmas = common.karras_sigmas(18, cd.SIGMA_MIN, cd.SIGMA_MAX, cd.RHO).float()
    x0 = torch.rand(6, 1, 32, 32) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    n = cd.draw_n(18, sigmas, 6, gen, "uniform")
    z = torch.randn(x0.shape, generator=gen)
    E = lambda x: inputs.append(x) or torch.zeros(len(x), 8)
    G = lambda net, x, sigma, z_sem: inputs.append((x, sigma)) or torch.zeros_like(x)
    sferd.alg1_cd(f, D, x0, torch.Generator().manual_seed(0), E, G, sigmas)
    _, target, f_x, alpha_p, s_p, w = seen[-1]
    t_ref, t2 = sigmas[n].view(-1, 1, 1, 1), sigmas[n + 1].view(-1, 1, 1, 1)
    x_E, (x_t, t) = inputs
    assert torch.equal(x_E, x0) and torch.equal(t, t_ref) and torch.allclose(x_t, x0 + t_ref * z)
    assert torch.allclose(target, f(cd.heun_step(D, x_t, t_ref, t2), t2), atol=1e-5) and not target.requires_grad
    assert torch.allclose(f_x, f(x_t, t_ref)) and f_x.requires_grad
    assert torch.allclose(alpha_p, 1 / (1 + t2**2).sqrt()) and torch.allclose(s_p, t2 / (1 + t2**2).sqrt())
    assert torch.equal(w, torch.ones(6))


# --- The paper preset, the predictor's input scaling, and what main builds ---------------------------------

# (key, value, source: the paper, as the header and PRESETS cite it; the authors' code where the paper gives none)
PAPER = [("w", 0.3, "Eq. 11: w = 0.3"), ("k", 1.0, "Eq. 10: k = 1"), ("blur_sigma", 3.0, "the blur's sigma 3"),
         ("blur_size", 15, "gaussian_diffusion.py: GaussianBlur(kernel_size=15)"), ("guidance_space", "x0", "Eq. 11"),
         ("no_guidance", False, "guidance on"), ("no_predictor", False, "the predictor on"),
         ("g_scale", "train", "line 18's scale (header)"), ("g_drop", 0.0, "G on every step"),
         ("z_dim", 512, "App. B: a 512-d z_sem"), ("pred_lr", 2e-4, "App. B: Adam 2e-4 for G_tau, E_phi"),
         ("latent_layers", 10, "Table 4: 10 layers"), ("latent_hidden", 2048, "Table 4: 2048 wide"),
         ("latent_batch", 512, "Table 4: batch 512"), ("latent_lr", 1e-4, "Table 4: lr 1e-4"),
         ("latent_ema", 0.9999, "Table 4: EMA 0.9999"), ("latent_iters", 100_000, "Table 4: 100k"),
         ("start_steps", 1024, "App. B.1: from 1024 steps"), ("schedule", "two-stage", "Table 6: two stages"),
         ("lr", 2e-4, "App. B.1: Adam 2e-4"), ("lr_schedule", "constant", "App. B.1: constant"),
         ("iters", 250_000, "Table 6: 32M images per stage at batch 128")]


@pytest.mark.parametrize("key,value,source", PAPER)
def test_paper_preset_values(key, value, source):
    assert getattr(sferd.parse_args(["--preset", "paper", "--nfe", "1"]), key) == value, source


def test_predictor_sees_the_students_scaled_input_and_its_own_decoder():
    """G_tau(x, sigma, z_sem) = conv_out(decode(student.encode(c_in*x, c_noise), z_sem)): EDM's c_in = 1/sqrt(sigma^2 +
    sigma_data^2) and c_noise = ln(sigma)/4 on the student's encoder (the student's scaling), its own decoder."""
    D = smoke_denoiser()
    G = nonzero_predictor(D)
    x, sigma, z_sem = torch.randn(2, 1, 32, 32) * 3, torch.tensor([0.5, 4.0]), torch.randn(2, 8)
    c_in = (1 / (sigma**2 + 0.25).sqrt()).view(-1, 1, 1, 1)
    h, skips, emb = D.net.encode(c_in * x, sigma.log() / 4)
    ref = G.body.conv_out(G.body.decode(h, skips, emb, cond=z_sem))
    assert torch.allclose(G(D.net, x, sigma, z_sem), ref, atol=1e-5)
    assert G.body.down is not None and len(G.body.down) == 0 and G.body.emb is None     # the encoder is the student's


def test_main_builds_the_phases_and_samples_with_g_and_the_latent_ema(fashion_dir, random_teacher, tmp_path, monkeypatch):
    """What sferd.main hands its loops and the report (MainSpy): the base phase (PD stage, guided teacher, pd_loss with
    n), then the predictor (Adam: E_phi and G_tau at pred_lr, the student at joint_lr; the student frozen for the first
    half of the updates, then trained), then the latent DDPM (Adam at latent_lr on normalised z_sem = E_phi(x0) of the
    data in [-1, 1], its EMA at latent_ema); the report samples the student (eval) with G_tau and the latent EMA."""
    monkeypatch.chdir(tmp_path)
    spy = MainSpy(monkeypatch)
    sferd.main(["--preset", "smoke", "--nfe", "4", "--data-dir", str(fashion_dir), "--teacher", str(random_teacher),
                "--out", str(tmp_path / "run")])
    assert [loop["kind"] for loop in spy.loops] == ["sferd-pd-student", "sferd-predictor", "sferd-latent"]
    base, pred, latent = spy.loops
    args = sferd.parse_args(["--preset", "smoke", "--nfe", "4"])
    assert base["teacher"].__name__ == "D_guided" and base["budget"].schedule is pd.linear_anneal
    assert base["settings"]["guidance"] is True and base["settings"]["w"] == 0.3
    student, opt = pred["student"], pred["opt"]
    assert student is base["student"] and pred["teacher"] is base["teacher"]
    (g1, g2) = opt.param_groups
    E, G = pred["nets"]["E"], pred["nets"]["G"]
    assert type(opt) is torch.optim.Adam and (g1["lr"], g2["lr"]) == (args.pred_lr, args.joint_lr)
    assert [id(p) for p in g1["params"]] == [id(p) for p in list(E.parameters()) + list(G.parameters())]
    assert [id(p) for p in g2["params"]] == [id(p) for p in student.net.parameters()]
    assert pred["budget"].lr == [args.pred_lr, args.joint_lr] and pred["budget"].total == 4
    for step, trains in ((0, False), (1, False), (2, True), (3, True)):         # Sec. 4.2: frozen, then joint
        pred["before_step"](step)
        assert all(p.requires_grad == trains for p in student.net.parameters()), step
    mlp, ema = latent["nets"]["mlp"], latent["nets"]["ema"]
    lopt = latent["opt"]
    assert type(lopt) is torch.optim.Adam and lopt.param_groups[0]["lr"] == args.latent_lr
    assert latent["emas"] == [(ema, mlp, args.latent_ema)] and latent["budget"].batch == args.latent_batch
    images, _ = common.load_dataset("fashion", fashion_dir)
    with torch.no_grad():
        z = E(common.to_float(images))
    assert torch.allclose(mlp.mean, z.mean(0), atol=1e-5) and torch.allclose(mlp.std, z.std(0), atol=1e-5)
    assert torch.allclose(latent["data"], (z - z.mean(0)) / z.std(0), atol=1e-4)          # App. B.1: normalised
    (rep,) = spy.reports
    assert rep["training"][id(student.net)] is False and rep["training"][id(ema)] is False
    assert rep["info"]["guidance"] and rep["info"]["predictor"] and rep["info"]["guidance_space"] == "x0"
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    z_sem = sferd.sample_latent(ema, cd.renoise_source(eps, common.EVAL_SEED + 1).randn(8), args.latent_steps, ema.mean,
                                 ema.std, sferd.LATENT_ALPHA_BAR)
    assert torch.equal(rep["sample_fn"](eps), sferd.sample_sferd_pd(student, eps, 4, G, z_sem, "train", 0.0, 2))
    assert not torch.allclose(rep["sample_fn"](eps), pd.sample_ddim(student, eps, 4), atol=1e-4)
