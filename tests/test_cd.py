"""Tests of cd.py: the consistency function's boundary condition, the Heun teacher step, the
stop-gradient target, the EMA updates, multistep re-noising, and the command line."""
import hashlib
import json
import math
import sys

import pytest
import torch

import cd
import common
from conftest import MainSpy, check_run_pictures, gaussian_denoiser, run_script

torch.set_num_threads(2)
EPS, SD = cd.SIGMA_MIN, common.SIGMA_DATA


def random_net(seed=0):
    """A smoke U-Net whose zero-initialised output conv is randomised, so F(x) != 0."""
    torch.manual_seed(seed)
    net = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"])
    torch.nn.init.normal_(net.conv_out.weight, std=0.2)
    torch.nn.init.normal_(net.conv_out.bias, std=0.2)
    return net


# --- The consistency function (Eq. 5, App. C) ------------------------------------------------

def test_boundary_condition_is_exact():
    f = cd.ConsistencyFunction(random_net())
    x = torch.randn(4, 1, 32, 32) * torch.tensor([1.0, 10.0, 80.0, 0.01]).reshape(-1, 1, 1, 1)
    assert torch.equal(f(x, EPS), x)                                    # f(x, eps) = x, bit for bit
    sigma = torch.tensor([EPS, 0.5, EPS, 3.0])                          # per-sample sigma
    out = f(x, sigma)
    assert torch.equal(out[[0, 2]], x[[0, 2]])
    assert (out[[1, 3]] - x[[1, 3]]).abs().max() > 1e-2                 # elsewhere the network matters


def test_consistency_parameterisation_against_formula():
    net = random_net(1)
    f = cd.ConsistencyFunction(net)
    x = torch.randn(3, 1, 32, 32)
    s = torch.tensor([0.01, 1.0, 40.0]).reshape(-1, 1, 1, 1)
    c_skip = SD**2 / ((s - EPS) ** 2 + SD**2)
    c_out = SD * (s - EPS) / torch.sqrt(s**2 + SD**2)
    F_x = net(x / torch.sqrt(s**2 + SD**2), torch.log(s).flatten() / 4)
    assert torch.allclose(f(x, s.flatten()), c_skip * x + c_out * F_x, atol=1e-5)
    # Far from eps it is EDM's denoiser with the same F (why the teacher's F is a good start).
    assert torch.allclose(f(x, 40.0), common.Denoiser(net)(x, 40.0), atol=1e-3)


# --- The teacher's Heun step (Eq. 6) ---------------------------------------------------------

def test_heun_step_is_two_teacher_evaluations():
    D = common.Denoiser(random_net(2)).requires_grad_(False)
    x = torch.randn(3, 1, 32, 32) * 5
    t, t2 = torch.tensor([8.4, 1.09, 0.0229]), torch.tensor([5.32, 0.585, 0.0075])
    out = cd.heun_step(D, x, t.reshape(-1, 1, 1, 1), t2.reshape(-1, 1, 1, 1))
    for k in range(3):                                                  # written out, one sample at a time
        xk, tk, t2k = x[k:k + 1], t[k].item(), t2[k].item()
        d = (xk - D(xk, tk)) / tk
        x_euler = xk + (t2k - tk) * d
        d2 = (x_euler - D(x_euler, t2k)) / t2k
        assert torch.allclose(out[k:k + 1], xk + (t2k - tk) * (d + d2) / 2, atol=1e-5)
        assert torch.allclose(out[k:k + 1], common.sample_heun(D, xk, [tk, t2k]), atol=1e-5)


def test_heun_step_is_second_order_on_gaussian_data():
    # Data N(0, SD^2): D(x, s) = x*SD^2/(s^2 + SD^2), and the ODE's exact solution is
    # x(t2) = x(t)*sqrt(t2^2 + SD^2)/sqrt(t^2 + SD^2). Heun's local error is O(h^3) (Euler: O(h^2)).
    D = gaussian_denoiser(var=SD**2)
    x = torch.ones(1, dtype=torch.float64)
    t = 1.0
    errors = []
    for h in (0.2, 0.1, 0.05):
        exact = x * math.sqrt((t - h) ** 2 + SD**2) / math.sqrt(t**2 + SD**2)
        errors.append((cd.heun_step(D, x, t, t - h) - exact).abs().item())
    for e1, e2 in zip(errors, errors[1:]):
        assert 6 < e1 / e2 < 10                                         # ~2^3


# --- The loss: target without gradient (Eq. 7), EMA updates (Eq. 8) ---------------------------

def drawn(seed, x0, sigmas, n_dist="uniform"):
    """What cd_loss draws from a generator seeded with seed, in its order: n (Alg. 2 line 3), then z (line 4)."""
    g = torch.Generator().manual_seed(seed)
    n = cd.draw_n(len(sigmas), sigmas, len(x0), g, n_dist)
    return n, torch.randn(x0.shape, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("metric", ["l2", "pseudo-huber"])
def test_target_is_computed_without_gradient(metric):
    f = cd.ConsistencyFunction(random_net(3))
    D = common.Denoiser(random_net(4)).requires_grad_(False)
    sigmas = common.karras_sigmas(18).float()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    n, z = drawn(0, x0, sigmas)
    assert (n < 16).sum() == 3 and n[3] == 16              # t2 > eps: the target depends on theta (t2 = eps: it is x_hat)
    loss = cd.cd_loss(f, D, x0, gen(0), f_target=f, sigmas=sigmas, metric=metric)   # mu = 0: theta- is theta itself
    grads = torch.autograd.grad(loss, list(f.parameters()))

    def independent(detach):
        t, t2 = sigmas[n].reshape(-1, 1, 1, 1), sigmas[n + 1].reshape(-1, 1, 1, 1)
        x_t = x0 + t * z
        d = (x_t - D(x_t, t)) / t
        x_e = x_t + (t2 - t) * d
        x_hat = x_t + (t2 - t) * (d + (x_e - D(x_e, t2)) / t2) / 2
        target = f(x_hat, t2)
        target = target.detach() if detach else target
        diff2 = ((f(x_t, t) - target) ** 2).flatten(1)
        if metric == "l2":
            per = diff2.mean(1)
        else:
            c = 0.00054 * math.sqrt(32 * 32)
            per = torch.sqrt(diff2.sum(1) + c**2) - c
        return per.mean()

    ref = independent(detach=True)
    assert torch.allclose(loss, ref, rtol=1e-5)
    ref_grads = torch.autograd.grad(ref, list(f.parameters()))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)
    # Without the stop-gradient the gradient would differ (so this test can fail).
    no_stop = torch.autograd.grad(independent(detach=False), list(f.parameters()))
    assert max((g - r).abs().max().item() for g, r in zip(grads, no_stop)) > 1e-4


def test_loss_weighting_lambda():
    f = cd.ConsistencyFunction(random_net(3))
    D = common.Denoiser(random_net(4)).requires_grad_(False)
    sigmas = common.karras_sigmas(18).float()
    n = torch.tensor([0, 5, 11, 15])
    assert torch.equal(cd.weights(n, sigmas, "uniform"), torch.ones(4))             # the paper: lambda = 1
    lam = cd.weights(n, sigmas, "inv-gap")                                           # iCT: 1/(t_n - t_{n+1})
    assert torch.allclose(lam, 1 / (sigmas[n] - sigmas[n + 1]))
    assert lam[0] < 0.05 and lam[3] > 60                                             # 80 -> 57.6 vs 0.023 -> 0.0075
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    n, z = drawn(1, x0, sigmas)
    lam = 1 / (sigmas[n] - sigmas[n + 1])
    per = []
    for k in range(4):                                  # each sample's unweighted l2 term with cd_pair's target
        x_t, t, _, target = cd.cd_pair(f, D, x0[k:k + 1], n[k:k + 1], z[k:k + 1], sigmas)
        per.append(((f(x_t, t) - target) ** 2).mean())
    weighted = cd.cd_loss(f, D, x0, gen(1), f_target=f, sigmas=sigmas, metric="l2", weighting="inv-gap")
    assert torch.allclose(weighted, sum(l * p for l, p in zip(lam, per)) / 4, rtol=1e-4)
    uniform = cd.cd_loss(f, D, x0, gen(1), f_target=f, sigmas=sigmas, metric="l2")
    assert torch.allclose(uniform, sum(per) / 4, rtol=1e-4) and not torch.allclose(uniform, weighted, rtol=1e-2)


def test_weighting_is_the_papers_except_in_the_lab_preset():
    """lambda = 1 and uniform n (Eq. 7, Alg. 2) in the paper and smoke presets; the lab preset's iCT weight
    is a documented deviation; the flags win."""
    runs = [cd.parse_args(["--preset", p]) for p in ("paper", "lab", "smoke")]
    assert [a.weighting for a in runs] == ["uniform", "inv-gap", "uniform"]
    assert all(a.n_dist == "uniform" for a in runs)
    a = cd.parse_args(["--preset", "lab", "--weighting", "uniform", "--n-dist", "lognormal"])
    assert (a.weighting, a.n_dist) == ("uniform", "lognormal")
    with pytest.raises(common.UserError, match="--metric"):
        cd.parse_args(["--metric", "lpips"])


def test_lognormal_n_follows_icts_distribution():
    sigmas = common.karras_sigmas(18)
    gen = torch.Generator().manual_seed(0)
    n = cd.draw_n(18, sigmas, 200_000, gen, "lognormal")
    assert torch.equal(n.unique(), torch.arange(17))                                  # every interval 0..N-2, no other
    freq = torch.bincount(n, minlength=17).double() / len(n)
    # p(n) = P(ln sigma in [ln t2, ln t]) for ln sigma ~ N(-1.1, 2.0^2), renormalised to the grid's range.
    normal = torch.distributions.Normal(-1.1, 2.0)
    p = normal.cdf(sigmas[:-1].log()) - normal.cdf(sigmas[1:].log())
    assert torch.allclose(freq, p / p.sum(), atol=3e-3)
    assert freq.argmax() == 12                                                       # the mode near sigma 0.3
    uniform = torch.bincount(cd.draw_n(18, sigmas, 170_000, gen, "uniform"), minlength=17).double() / 170_000
    assert torch.allclose(uniform, torch.full((17,), 1 / 17, dtype=torch.float64), atol=3e-3)


def test_training_step_updates_target_and_sampling_ema():
    """One iteration as train_loop runs it: the step of theta on cd_loss (Alg. 2 line 7), then ema_updates:
    theta- (line 8, Eq. 8), then the sampling EMA; with mu = 0 only the sampling EMA (theta- is theta)."""
    D = common.Denoiser(random_net(5)).requires_grad_(False)
    f = cd.ConsistencyFunction(random_net(6))
    f_target = cd.ConsistencyFunction(random_net(7)).requires_grad_(False)    # theta- != theta before the step
    f_ema = cd.ConsistencyFunction(random_net(8)).requires_grad_(False)
    opt = torch.optim.RAdam(f.parameters(), lr=1e-3)
    target_old = [p.clone() for p in f_target.parameters()]
    ema_old = [p.clone() for p in f_ema.parameters()]
    theta_old = [p.clone() for p in f.parameters()]
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    emas = cd.ema_updates(f, f_target, f_ema, 0.9, 0.8)
    assert [e[0] for e in emas] == [f_target, f_ema] and cd.ema_updates(f, f, f_ema, 0.0, 0.8) == [(f_ema, f, 0.8)]
    loss = cd.cd_loss(f, D, x0, gen(0), f_target=f_target, sigmas=common.karras_sigmas(18).float(), metric="pseudo-huber")
    common.optimizer_steps(common.Dist("cpu"), loss, opt, list(f.parameters()), emas=emas)
    theta = list(f.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(theta, theta_old))                 # the student moved
    for p, old, new in zip(f_target.parameters(), target_old, theta):                  # Eq. 8
        assert torch.allclose(p, 0.9 * old + 0.1 * new, atol=1e-6)
    for p, old, new in zip(f_ema.parameters(), ema_old, theta):
        assert torch.allclose(p, 0.8 * old + 0.2 * new, atol=1e-6)


def test_loss_target_is_f_target_not_f():
    """Eq. 7's target is f_theta-(x_hat_t2, t2): with theta- != theta the loss uses theta-, not theta."""
    f, f_target = cd.ConsistencyFunction(random_net(3)), cd.ConsistencyFunction(random_net(7)).requires_grad_(False)
    D = common.Denoiser(random_net(4)).requires_grad_(False)
    sigmas = common.karras_sigmas(18).float()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    n, z = drawn(2, x0, sigmas)
    t, t2 = sigmas[n].reshape(-1, 1, 1, 1), sigmas[n + 1].reshape(-1, 1, 1, 1)
    x_t = x0 + t * z
    with torch.no_grad():
        x_hat = cd.heun_step(D, x_t, t, t2)
        by_target, by_f = f_target(x_hat, t2), f(x_hat, t2)
    assert (by_target - by_f).abs().max() > 1e-2                        # the two targets differ here
    loss = cd.cd_loss(f, D, x0, gen(2), f_target=f_target, sigmas=sigmas, metric="l2")
    per = lambda target: ((f(x_t, t) - target) ** 2).flatten(1).mean(1).mean()
    assert torch.allclose(loss, per(by_target), rtol=1e-5)
    assert not torch.allclose(loss, per(by_f), rtol=1e-3)
    # cd_pair (sferd.py's CD terms) is cd_loss's x_t and target for the same n and z.
    x_t2, t_, t2_, target = cd.cd_pair(f_target, D, x0, n, z, sigmas)
    assert torch.equal(x_t2, x_t) and torch.equal(t_, t) and torch.equal(t2_, t2) and torch.equal(target, by_target)


def test_pseudo_huber_constant_counts_every_channel():
    """iCT's c = 0.00054*sqrt(d), d = C*H*W (3*32*32 = 3072 -> c = 0.0299), not H*W."""
    a = torch.zeros(2, 3, 32, 32)
    b = torch.full((2, 3, 32, 32), 0.001)
    b[1] = 0.01
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    sq = ((a - b) ** 2).flatten(1).sum(1)
    assert torch.allclose(cd.distance(a, b, "pseudo-huber"), (sq + c**2).sqrt() - c, rtol=1e-5)
    c_hw = 0.00054 * math.sqrt(32 * 32)
    assert not torch.allclose(cd.distance(a, b, "pseudo-huber"), (sq + c_hw**2).sqrt() - c_hw, rtol=1e-2)
    assert torch.allclose(cd.distance(a, b, "l2"), ((a - b) ** 2).flatten(1).mean(1))


def test_target_and_sampling_networks_have_no_dropout():
    """With the teacher's dropout (the paper net: 0.1), theta, theta- and the sampling EMA are built without it
    (the authors' CD config: model.dropout = 0), so the target is deterministic even in train mode."""
    torch.manual_seed(0)
    net = common.build_net(dict(in_ch=1, res=32, **common.NET_CONFIGS["smoke"]), dropout=0.5)
    torch.nn.init.normal_(net.conv_out.weight, std=0.2)
    D = common.Denoiser(net).requires_grad_(False)
    f, f_target, f_ema = cd.consistency_nets(D, mu=0.9)
    assert f_target is not f and f_ema is not f
    x = torch.randn(2, 1, 32, 32) * 5
    for g in (f, f_target, f_ema):
        assert all(m.p == 0 for m in g.modules() if isinstance(m, torch.nn.Dropout))
        g.train()
        with torch.no_grad():
            assert torch.equal(g(x, 5.0), g(x, 5.0))                        # no dropout noise
            assert torch.equal(g(x, 5.0), f(x, 5.0))                        # all start as theta = the teacher's F
    f2, f_target2, _ = cd.consistency_nets(D, mu=0.0)
    assert f_target2 is f2                                                  # mu = 0: stopgrad of theta itself


# --- Multistep sampling (Alg. 1) ------------------------------------------------------------

def test_multistep_renoising_variance():
    taus = [1.0, 0.05, 0.0025]                 # near eps, sqrt(tau^2 - eps^2) differs from tau
    seen, calls = [], []
    zero = lambda x, s: (calls.append(float(s)), torch.zeros_like(x))[1]
    draws = [torch.randn(2, 1, 4, 4) for _ in taus]
    it = iter(draws)
    cd.sample_cd(zero, torch.randn(2, 1, 4, 4), taus, lambda x: next(it), callback=lambda i, x: seen.append(x))
    assert calls == [cd.SIGMA_MAX] + taus                              # f at T, then at each tau
    for x_hat, z, tau in zip(seen, draws, taus):
        assert torch.allclose(x_hat, math.sqrt(tau**2 - EPS**2) * z)
    # The re-noised state's std is sqrt(tau^2 - eps^2) (the marginal at tau, minus the eps at which f lands).
    seen.clear()
    cd.sample_cd(zero, torch.randn(20_000, 1, 4, 4), taus, torch.randn_like, callback=lambda i, x: seen.append(x))
    for x_hat, tau in zip(seen, taus):
        assert x_hat.std().item() == pytest.approx(math.sqrt(tau**2 - EPS**2), rel=0.01)


def test_sampler_starts_at_sigma_max_and_clips_before_renoising():
    """make_sampler starts at x_T = T*eps, f(x_T, T) (Alg. 1 line 1); with clip, x is clamped to [-1, 1]
    before each re-noising (the authors' samplers), without it not."""
    f = cd.ConsistencyFunction(random_net(9)).eval()
    eps = common.PerSampleNoise(2, range(3)).randn(1, 32, 32)
    with torch.no_grad():
        one = f(cd.SIGMA_MAX * eps, cd.SIGMA_MAX)
    assert torch.equal(cd.make_sampler(f, [])(eps), one)
    assert not torch.allclose(cd.make_sampler(f, [])(eps), f(eps, cd.SIGMA_MAX), atol=1e-3)
    taus = [1.09, 0.3]
    for clip in (False, True):
        expected = cd.sample_cd(f, cd.SIGMA_MAX * eps, taus, cd.renoise_source(eps).randn_like, clip=clip)
        assert torch.equal(cd.make_sampler(f, taus, clip)(eps), expected)
    wide = lambda x, s: 3 * x / (1 + torch.as_tensor(s))            # x far outside [-1, 1] after the first call
    x_T, seen = torch.randn(2, 1, 4, 4) * cd.SIGMA_MAX, {}
    z = torch.randn(2, 1, 4, 4)
    for clip in (False, True):
        cd.sample_cd(wide, x_T, [0.5], lambda x: z, clip=clip, callback=lambda i, x_hat: seen.__setitem__(clip, x_hat))
    x0 = wide(x_T, cd.SIGMA_MAX)
    assert x0.abs().max() > 1
    noise = math.sqrt(0.5**2 - EPS**2) * z
    assert torch.allclose(seen[False], x0 + noise) and torch.allclose(seen[True], x0.clamp(-1, 1) + noise)
    cd.sample_cd(wide, x_T, [0.5], lambda x: z, callback=lambda i, x_hat: seen.__setitem__("default", x_hat))
    assert torch.equal(seen["default"], seen[False])                   # Alg. 1's way unless asked (SFERD-CD's sampler)
    taus = [1.09, 0.3]
    assert torch.equal(cd.make_sampler(f, taus)(eps), cd.make_sampler(f, taus, False)(eps))
    assert not torch.equal(cd.make_sampler(f, taus)(eps), cd.make_sampler(f, taus, True)(eps))


def test_renoising_noise_is_keyed_by_each_samples_starting_noise():
    """renoise_source: sample k's re-noising generator is seeded EVAL_SEED*1_000_003 + its key, the first 6 bytes of
    the SHA-1 of its starting noise (big-endian): the evaluation noise every published number was measured with."""
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    draws = cd.renoise_source(eps).randn(3)
    for k in range(2):
        key = int.from_bytes(hashlib.sha1(eps[k].numpy().tobytes()).digest()[:6], "big")
        g = torch.Generator().manual_seed(common.EVAL_SEED * 1_000_003 + key)
        assert torch.equal(draws[k], torch.randn(3, generator=g))


def test_samples_do_not_depend_on_batching():
    f = cd.ConsistencyFunction(random_net(9)).eval()
    sample = cd.make_sampler(f, [1.09, 0.3])
    eps = common.PerSampleNoise(1, range(6)).randn(1, 32, 32)
    whole = sample(eps)
    parts = torch.cat([sample(eps[:2]), sample(eps[2:])])
    reversed_ = sample(eps.flip(0)).flip(0)
    # Same noise per sample; only the convolutions' float rounding may differ with the batch size.
    assert torch.allclose(whole, parts, atol=1e-5) and torch.allclose(whole, reversed_, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])


# --- Command line ----------------------------------------------------------------------------

def test_nfe_validation():
    grid = [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)]   # EDM Eq. 5, by hand
    assert cd.sampling_taus(1) == [] and cd.sampling_taus(2) == pytest.approx([grid[11]], rel=1e-15, abs=0)  # 0.585348
    assert cd.sampling_taus(4) == pytest.approx([grid[9], grid[11], grid[13]], rel=1e-15, abs=0)  # indexed, not rounded
    assert cd.sampling_taus(3) == pytest.approx([grid[9], grid[12]], rel=1e-15, abs=0)
    with pytest.raises(common.UserError, match="pass --taus with 4 decreasing values"):       # --nfe 5: 4 sigmas
        cd.sampling_taus(5)
    with pytest.raises(common.UserError, match="--nfe 3 needs 2 re-noising sigmas, --taus gave 1"):
        cd.sampling_taus(3, [1.0])
    assert len(cd.sampling_taus(3)) == 2 and len(cd.sampling_taus(4)) == 3
    assert cd.sampling_taus(3, [2.0, 0.1]) == [2.0, 0.1]
    with pytest.raises(common.UserError, match="at least one network call"):
        cd.sampling_taus(0)
    for nfe, taus in ((0, None), (5, None), (3, [1.0]), (2, [1.0, 0.5]), (3, [0.1, 2.0]), (3, [1.0, 1.0]), (2, [80.0]),
                      (2, [100.0]), (2, [0.002]), (2, [0.001])):
        with pytest.raises(common.UserError):
            cd.sampling_taus(nfe, taus)


def common_args(fashion_dir, smoke_teacher, out):
    return ["--dataset", "fashion", "--data-dir", fashion_dir, "--teacher", smoke_teacher, "--preset", "smoke",
            "--device", "cpu", "--out", out]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One working folder for every CLI run of this file, so runs/<dataset>/fid/ (the FID reference
    statistics, cached under the working folder) is computed once."""
    return tmp_path_factory.mktemp("cd")


@pytest.mark.parametrize("bad", [["--nfe", "0"], ["--nfe", "6"], ["--nfe", "3", "--taus", "1.0"]])
def test_cli_bad_nfe_is_one_line(fashion_dir, smoke_teacher, work, bad):
    r = run_script("cd.py", *common_args(fashion_dir, smoke_teacher, work / "bad"), *bad, cwd=work)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


@pytest.fixture(scope="module")
def full_run(fashion_dir, smoke_teacher, work):
    """An uninterrupted 8-iteration smoke run at NFE 4."""
    r = run_script("cd.py", *common_args(fashion_dir, smoke_teacher, work / "full"), "--iterations", "8", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "full", r


def test_smoke_end_to_end(full_run):
    out, r = full_run
    m = json.loads((out / "nfe4" / "metrics.json").read_text())
    assert m["method"] == "cd" and m["nfe"] == 4 and m["images_seen"] == 8 * 8 and len(m["taus"]) == 3
    for key in ("fid", "fid_n", "teacher_fid_dpm3m", "teacher_fid_euler", "teacher_rms", "teacher_rms_dpm3m",
                "teacher_rms_euler", "train_seconds", "onestep_teacher_rms", "onestep_teacher_rms_euler"):
        assert key in m
    assert (out / "nfe4" / "samples.png").exists() and (out / "student.pt").exists()
    check_run_pictures(out / "nfe4", ["CD"])
    assert "NFE 4" in r.stdout.strip().splitlines()[-1]


def test_other_nfe_reuses_the_finished_student(full_run, fashion_dir, smoke_teacher, work):
    """The consistency model does not depend on the NFE: --nfe 1 --resume only samples, into nfe1/,
    and leaves nfe4/ as it was; a changed training setting is refused."""
    out, _ = full_run
    before = (out / "nfe4" / "metrics.json").read_text()
    weights = common.load_checkpoint(out / "student.pt", "cd-student")["ema"]
    r = run_script("cd.py", *common_args(fashion_dir, smoke_teacher, out), "--iterations", "8", "--nfe", "1",
                   "--resume", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming CD at 8 of 8 updates" in r.stdout + r.stderr and "NFE 1" in r.stdout.strip().splitlines()[-1]
    m1 = json.loads((out / "nfe1" / "metrics.json").read_text())
    assert m1["nfe"] == 1 and m1["taus"] == [] and m1["images_seen"] == 8 * 8
    assert (out / "nfe4" / "metrics.json").read_text() == before
    after = common.load_checkpoint(out / "student.pt", "cd-student")["ema"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    r = run_script("cd.py", *common_args(fashion_dir, smoke_teacher, out), "--lr", "1e-3", "--resume", cwd=work)
    assert r.returncode == 2 and "other settings: lr 0.0004 (now 0.001)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resume_continues_exactly(full_run, fashion_dir, smoke_teacher, work):
    out = work / "resumed"
    args = common_args(fashion_dir, smoke_teacher, out)
    r = run_script("cd.py", *args, "--iterations", "4", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert common.load_checkpoint(out / "student.pt", "cd-student")["step"] == 4
    r = run_script("cd.py", *args, "--iterations", "8", "--resume", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming CD at 4 of 8 updates" in r.stdout + r.stderr
    resumed = common.load_checkpoint(out / "student.pt", "cd-student")
    straight = common.load_checkpoint(full_run[0] / "student.pt", "cd-student")
    assert resumed["step"] == straight["step"] == 8
    for key in ("net", "ema"):
        for name in straight[key]:
            assert torch.equal(resumed[key][name], straight[key][name]), (key, name)


def test_torchrun_two_processes(fashion_dir, smoke_teacher, work):
    out = work / "ddp"
    r = run_script("cd.py", *common_args(fashion_dir, smoke_teacher, out), "--mu", "0.5", cwd=work, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "nfe4" / "metrics.json").read_text())
    assert m["nfe"] == 4 and m["mu"] == 0.5 and m["images_seen"] == 8 * cd.PRESETS["smoke"]["batch"]
    assert "target" in common.load_checkpoint(out / "student.pt", "cd-student")      # theta- kept when mu > 0


# --- Flips, the paper preset's values, and what main builds -----------------------------------

def test_xflip_draws_the_flips_first_and_is_on_by_default():
    """--xflip (on: the authors' CIFAR-10 random_flip): cd_loss flips x0 with pd.random_xflip's draws first, then
    draws n and z; the loss is that of the flipped batch, and differs from the unflipped one."""
    f = cd.ConsistencyFunction(random_net(3))
    D = common.Denoiser(random_net(4)).requires_grad_(False)
    sigmas = common.karras_sigmas(18).float()
    x0 = torch.rand(6, 1, 32, 32) * 2 - 1
    x0[:, :, :, :16] = -1                                              # left half dark: a flip changes the image
    g = gen(5)
    flip = torch.rand(6, generator=g) < 0.5                            # pd.random_xflip's draw, written out
    flipped = torch.where(flip.reshape(-1, 1, 1, 1), x0.flip(-1), x0)
    n, z = cd.draw_n(18, sigmas, 6, g, "uniform"), torch.randn(x0.shape, generator=g)
    assert 0 < flip.sum() < 6
    x_t, t, _, target = cd.cd_pair(f, D, flipped, n, z, sigmas)
    ref = cd.distance(f(x_t, t), target, "l2").mean()
    loss = cd.cd_loss(f, D, x0, gen(5), f_target=f, sigmas=sigmas, metric="l2", xflip=True)
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert not torch.allclose(loss, cd.cd_loss(f, D, x0, gen(5), f_target=f, sigmas=sigmas, metric="l2"), rtol=1e-3)
    assert all(cd.parse_args(["--preset", p]).xflip for p in ("smoke", "lab", "paper"))
    assert not cd.parse_args(["--no-xflip"]).xflip


# (flag or preset key, value, the number the header and PRESETS cite)
PAPER = [("batch", 512, "consistency_models_cifar10 configs/cifar10_ve_cd.py training.batch_size"),
         ("lr", 4e-4, "cifar10_ve_cd.py optim.lr (RAdam)"),
         ("iterations", 800_000, "the paper's CIFAR-10 CD: 800k iterations"),
         ("N", 18, "cifar10_ve_cd.py model.num_scales"),
         ("mu", 0.0, "the authors' CIFAR-10 CD: mu = 0 (stopgrad)"),
         ("ema_rate", 0.9999, "cifar10_ve_cd.py model.ema_rate"),
         ("weighting", "uniform", "Eq. 7: lambda(t_n) = 1"),
         ("n_dist", "uniform", "Alg. 2 line 3: n ~ U[[1, N-1]]"),
         ("metric", "pseudo-huber", "deviation: LPIPS needs VGG weights (header)"),
         ("xflip", True, "default_cifar10_configs.py data.random_flip"),
         ("clip", True, "the authors' samplers clamp before re-noising (header)")]


@pytest.mark.parametrize("key,value,source", PAPER)
def test_paper_preset_values(key, value, source):
    assert getattr(cd.parse_args(["--preset", "paper"]), key) == value, source


def test_main_builds_radam_the_karras_grid_and_samples_from_the_ema(fashion_dir, random_teacher, tmp_path, monkeypatch):
    """What cd.main hands the loop and the report (MainSpy): RAdam (eta, betas 0.9/0.999, eps 1e-8, no weight decay,
    no clipping or schedule), cd_loss on the 18-point Karras grid with the preset's d, lambda, n and flips, theta- =
    theta at mu = 0, the sampling EMA at ema_rate; the student trains in train mode; the report samples the EMA in
    eval mode with the exact grid taus and the clamp, not the online network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cd, "onestep_rms", lambda *a: {})
    spy = MainSpy(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["cd.py", "--preset", "smoke", "--nfe", "2", "--data-dir", str(fashion_dir),
                                      "--teacher", str(random_teacher), "--out", str(tmp_path / "run")])
    cd.main()
    (loop,), (rep,) = spy.loops, spy.reports
    opt, f = loop["opt"], loop["student"]
    assert type(opt) is torch.optim.RAdam and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (4e-4, (0.9, 0.999), 1e-8, 0)
    assert [id(p) for p in group["params"]] == [id(p) for p in f.parameters()]
    assert loop["budget"] == common.Budget(total=8, unit="updates", batch=8, lr=4e-4, ckpt_every=4)
    assert isinstance(f, cd.ConsistencyFunction) and loop["student_training"] and loop["training"]["net"]
    assert set(loop["nets"]) == {"net", "ema"} and loop["nets"]["net"] is f.net
    ((ema, model, beta),) = loop["emas"]
    assert model is f and ema.net is loop["nets"]["ema"] and beta == 0.5
    kw = loop["loss"].keywords
    grid = torch.tensor([(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)],
                        dtype=torch.float64)
    assert torch.allclose(kw["sigmas"].double(), grid, rtol=1e-6)
    assert (kw["f_target"], kw["metric"], kw["weighting"], kw["n_dist"], kw["xflip"]) == (f, "pseudo-huber", "uniform",
                                                                                          "uniform", True)
    assert loop["settings"]["xflip"] is True and loop["teacher"].source == str(random_teacher)
    assert rep["info"]["taus"] == pytest.approx([grid[11].item()], rel=1e-15) and rep["info"]["xflip"] is True
    assert rep["training"][id(ema.net)] is False
    eps = common.PerSampleNoise(3, range(2)).randn(1, 32, 32)
    sample = lambda g: cd.sample_cd(g, 80 * eps, [grid[11].item()], cd.renoise_source(eps).randn_like, clip=True)
    assert torch.equal(rep["sample_fn"](eps), sample(ema))
    assert not torch.allclose(rep["sample_fn"](eps), sample(f), atol=1e-4)            # not the online network
