"""Tests of sferd.py: the attention-guided teacher (blur, attention map, mask, Alg. 1 lines 8-13), the
semantic gradient predictor (zero init, loss scale of Alg. 1 line 18, Alg. 2's sampling correction), and
the CLI (--nfe validation, smoke runs on PD and CD, --resume, torchrun with two processes)."""
import json
import math

import pytest
import torch

import common
import pd
import sferd
from conftest import run_script

torch.set_num_threads(2)


def smoke_denoiser(seed=0):
    """A smoke-sized U-Net with random (non-zero) output and attention weights, as a Denoiser."""
    torch.manual_seed(seed)
    net = common.UNet(in_ch=1, res=32, **common.NET_CONFIGS["smoke"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.2)
    return common.Denoiser(net).eval().requires_grad_(False)


def cosine(t):
    """alpha_t, s_t of the cosine schedule, written out independently (lmin = -20, lmax = 20)."""
    b = math.atan(math.exp(-10))
    a = math.atan(math.exp(10)) - b
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


def test_attention_summed_over_queries_has_mean_exactly_one():
    D = smoke_denoiser()
    x = torch.randn(3, 1, 32, 32)
    _, extras = D(x, torch.tensor([0.5, 2.0, 10.0]), attn="dec16.1")
    attn = extras["attn"]                                          # B x heads x queries x keys
    A = sferd.attention_received(attn)
    assert A.shape == (3, 16 * 16)
    ref = torch.stack([sum(attn[b, :, q, :].mean(0) for q in range(attn.shape[2])) for b in range(3)])
    assert torch.allclose(A, ref, atol=1e-5)
    assert torch.allclose(A.mean(1), torch.ones(3), atol=1e-5)
    assert A.std() > 0.01                                          # not trivially uniform


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


def test_default_attention_block_is_highest_resolution_decoder():
    D = smoke_denoiser()
    assert D.net.attn_names == ["enc16.0", "mid16", "dec16.0", "dec16.1"]
    assert sferd.default_attn_block(D.net) == "dec16.1"


def test_w0_gives_the_plain_teacher_and_w_matches_alg1_in_vp_notation():
    D = smoke_denoiser()
    x = torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.7, 3.0])
    assert torch.allclose(sferd.GuidedTeacher(D, w=0.0)(x, sigma), D(x, sigma), atol=1e-6)
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
    out = common.vp_predict(sferd.GuidedTeacher(D, k=k, w=w), z_t, alpha, s)[0]
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out - x0_hat).abs().max() > 1e-3                                           # guidance does something


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


def test_loss_scale_is_s_prev_squared_over_alpha_prev():
    N, t = 4, 0.75
    a_p, s_p = cosine(t - 1 / N)
    alpha_p, sigma_p = pd.alpha_sigma(torch.tensor([t - 1 / N], dtype=torch.float64), torch.zeros(1))
    assert abs(sferd.g_scale(alpha_p, sigma_p).item() - s_p**2 / a_p) < 1e-6
    torch.manual_seed(0)
    G, x0_t, x0_s = torch.randn(3, 2, 1, 32, 32).unbind(0)
    weight = torch.tensor([2.0, 1.0])
    scale = s_p**2 / a_p
    ref = (weight * ((scale * G - (x0_t - x0_s)) ** 2).mean(dim=(1, 2, 3))).mean()
    loss = sferd.predictor_loss(G, x0_t, x0_s, alpha_p, sigma_p, weight)
    assert abs(loss.item() - ref.item()) < 1e-5
    perfect = (x0_t - x0_s) / scale                                # the minimiser: scale*G = residual
    assert sferd.predictor_loss(perfect, x0_t, x0_s, alpha_p, sigma_p, weight).item() < 1e-8


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
    # A DDIM step from x0~ (Alg. 2, line 2): mu_{t-1}*x0~ + s_{t-1}*eps~.
    z_next = pd.ddim_step(z_t, ref, a_t, s_t, a_p, s_p)
    assert torch.allclose(z_next, a_p * ref + s_p * eps_tilde, atol=1e-5)


def test_latent_ddpm_table_and_l1_loss():
    abar = sferd.latent_alpha_bar()
    assert abs(abar[0].item() - 0.992) < 1e-6 and abs(abar[-1].item() - 0.992**1000) < 1e-6
    mlp = sferd.LatentMLP(8, 32, 3)
    z, eps = torch.randn(16, 8), torch.randn(16, 8)
    t = torch.randint(1000, (16,))
    assert abs(sferd.latent_loss(mlp, z, t, eps).item() - eps.abs().mean().item()) < 1e-6   # zero-init output
    out = sferd.sample_latent(mlp, torch.randn(5, 8), 10, torch.full((8,), 2.0), torch.full((8,), 0.5))
    assert out.shape == (5, 8) and torch.isfinite(out).all()


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
    assert m["method"] == "sferd" and m["variant"] == f"sferd-{base}" and m["nfe"] == 2 and m["guidance"]
    assert m["images_seen"] > m["base_phase_images"] > 0 and math.isfinite(m["teacher_rms"])
    assert "teacher_rms_euler" in m and "base_note" in m
    assert r.stdout.strip().splitlines()[-1].startswith(f"sferd-{base} fashion NFE 2")
    r2 = run_script("sferd.py", *common_args, "--resume", cwd=tmp_path)   # everything done: nothing retrains
    assert r2.returncode == 0, r2.stderr[-3000:]
    m2 = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m2["images_seen"] == m["images_seen"] and abs(m2["teacher_rms"] - m["teacher_rms"]) < 1e-6


def test_torchrun_two_processes(fashion_dir, smoke_teacher, tmp_path):
    r = run_script("sferd.py", "--preset", "smoke", "--nfe", "4", "--data-dir", fashion_dir, "--teacher",
                   smoke_teacher, "--out", tmp_path / "ddp", cwd=tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["variant"] == "sferd-pd" and m["nfe"] == 4
