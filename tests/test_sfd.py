"""Tests of sfd.py: the grids, AFS and the thresholded teacher (SFD's additions to the shared samplers), the
teacher read-out, Alg. 2's detached student steps with an update after each, SFD-v's step condition, --nfe
validation, the preset flags, the second stage's initialisation, and the CLI end to end."""
import json
import math
import sys

import numpy as np
import pytest
import torch

import common
import sfd
from conftest import MainSpy, check_run_pictures, gaussian_denoiser, run_script


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as run_script's subprocesses do: on a shared 2-core machine two
    OpenMP threads that wait on each other make these small networks ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_ode(x_T, T, t, sd=1.0):
    """Probability-flow ODE solution for Gaussian data: x(t) = x_T*sqrt(sd^2 + t^2)/sqrt(sd^2 + T^2)."""
    return x_T * ((sd**2 + t**2) / (sd**2 + T**2)) ** 0.5


def small_net(seed=0):
    """A smoke U-Net whose zero-initialised output conv is perturbed, so every weight gets a gradient."""
    torch.manual_seed(seed)
    net = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"])
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
    return net


# --- grids and AFS ----------------------------------------------------------------------------

def test_student_grid_matches_paper_example():
    t = sfd.student_grid(2)                              # NFE 2 -> 80, 10.929, 0.670, 0.006
    assert torch.allclose(t, torch.tensor([80.0, 10.929, 0.670, 0.006], dtype=torch.float64), atol=1e-3)
    assert len(sfd.student_grid(4)) == 4 + 2 and len(sfd.student_grid(4, afs=False)) == 4 + 1


@pytest.mark.parametrize("nfe,K", [(1, 4), (2, 4), (4, 4), (5, 3), (3, 2)])
def test_teacher_grid_contains_student_grid(nfe, K):
    t = sfd.student_grid(nfe)
    fine = sfd.teacher_grid(t, K)
    assert len(fine) == K * (len(t) - 1) + 1
    assert torch.equal(fine[::K], t)                      # every K-th point IS a student time (bit-exact)
    # ... and the whole finer grid is the polynomial (rho 7) grid of that many points (authors' get_schedule).
    assert torch.allclose(fine, common.karras_sigmas(len(fine), 0.006, 80.0, 7.0), rtol=1e-12, atol=0)
    assert (fine[1:] < fine[:-1]).all()


def test_second_stage_teacher_runs_on_the_first_stage_grid():
    K = (sfd.FIRST_STAGE_NFE + 1) // 2                    # 80 -> AFS -> t_min: 2 intervals, stage 1 has 6
    assert torch.allclose(sfd.teacher_grid(sfd.student_grid(1), K), sfd.student_grid(sfd.FIRST_STAGE_NFE), rtol=1e-12)


def test_afs_slope():
    # AFS replaces the first network call by the slope d = x/sqrt(1 + t^2) ...
    calls, x = [], torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = sfd.student_grid(4)
    euler_afs = sfd.TEACHER_SOLVERS["euler+afs"][0]                 # the student's sampler
    x1 = euler_afs(gaussian_denoiser(calls=calls), x, t[:2])
    t0, t1 = float(t[0]), float(t[1])
    assert calls == [] and torch.allclose(x1, x + (t1 - t0) * x / (1 + t0**2) ** 0.5, rtol=1e-14)
    assert torch.equal(x1, sfd.afs_step(x, t0, t1))
    # ... which is the exact ODE slope (x - D(x, t))/t of unit-variance data at t = 80 (D from conftest), to 1e-4.
    slope = (sfd.afs_step(x, t0, t1) - x) / (t1 - t0)
    exact = (x - gaussian_denoiser()(x, t0)) / t0
    assert torch.allclose(slope, exact, rtol=1e-4, atol=0) and not torch.allclose(slope, exact, rtol=1e-5, atol=0)
    # A whole AFS sampling run spends NFE = points - 2 network calls.
    calls.clear()
    euler_afs(gaussian_denoiser(calls=calls), x, t)
    assert len(calls) == len(t) - 2 == 4 and calls == t[1:-1].tolist()


@pytest.mark.parametrize("name,saved", [("euler", 1), ("heun", 2), ("dpm3m", 1)])
def test_afs_then_is_afs_and_the_plain_sampler_on_the_rest(name, saved):
    """AFS sits in front of a shared sampler: the same as that sampler from the AFS state on the rest of the
    grid, one network call (Heun: one step, two calls) fewer than the sampler on the whole grid; the callback
    still counts the steps of the whole grid."""
    D, x, t = gaussian_denoiser(0.1, 0.25), torch.randn(4, 1, 4, 4, dtype=torch.float64), sfd.student_grid(4)
    sampler, calls, plain = common.SAMPLERS[name], [], []
    seen = []
    out = sfd.afs_then(sampler)(gaussian_denoiser(0.1, 0.25, calls), x, t, lambda i, x_i: seen.append((i, x_i)))
    assert torch.equal(out, sampler(D, sfd.afs_step(x, float(t[0]), float(t[1])), t[1:]))
    sampler(gaussian_denoiser(0.1, 0.25, plain), x, t)
    assert len(calls) == len(plain) - saved
    assert [i for i, _ in seen] == list(range(len(t) - 1)) and torch.equal(seen[-1][1], out)


def test_dynamic_threshold():
    """Imagen's rule per sample: s = max(the 0.995 quantile of |x0|, 1), x0 <- clamp(x0, -s, s)/s (numpy's quantile)."""
    x = torch.tensor([[0.5, -0.2]]).reshape(1, 2, 1, 1)
    assert torch.equal(sfd.dynamic_threshold(x), x)                # within [-1, 1]: untouched
    y = torch.stack([torch.linspace(-3, 3, 1000), torch.linspace(-1.5, 0.5, 1000) ** 3]).reshape(2, 1, 10, 100)
    out = sfd.dynamic_threshold(y)
    for k in range(2):
        s = max(np.quantile(y[k].abs().double().numpy(), 0.995), 1.0)
        assert s > 1.5 and torch.allclose(out[k], y[k].clamp(-s, s) / s, rtol=1e-6)
        other = np.quantile(y[k].abs().double().numpy(), 0.99)      # another quantile thresholds elsewhere
        assert not torch.allclose(out[k], y[k].clamp(-other, other) / other, rtol=1e-4)
    # The thresholded teacher is a wrapper around D: every D(x, sigma) the solver sees is thresholded.
    D = lambda x, sigma: 3 * x
    z = torch.randn(2, 1, 4, 4)
    assert torch.equal(sfd.thresholded_denoiser(D)(z, 1.0), sfd.dynamic_threshold(3 * z))


# --- the teacher: multistep solver on the finer grid, read out at the student times -----------

def test_teacher_states_are_the_solver_at_student_times():
    torch.manual_seed(0)
    x_T, K = 80.0 * torch.randn(2, 1, 8, 8, dtype=torch.float64), 4
    t = sfd.student_grid(4)
    fine = sfd.teacher_grid(t, K)
    D = gaussian_denoiser()
    states = sfd.teacher_states(D, x_T, fine, K, "euler")
    assert len(states) == len(t) - 1
    for k, x_k in enumerate(states):                     # state k = Euler run up to fine point K*(k+1) = t_{k+1}
        assert torch.allclose(x_k, common.sample_euler(D, x_T, fine[: K * (k + 1) + 1]), rtol=1e-12)
    # The second stage's teacher samples with Euler + AFS: the read-out counts AFS as the grid's first step.
    for K1 in (1, 3):
        fine1 = sfd.teacher_grid(t, K1)
        states = sfd.teacher_states(D, x_T, fine1, K1, "euler+afs")
        assert len(states) == len(t) - 1
        for k, x_k in enumerate(states):
            assert torch.equal(x_k, sfd.afs_then(common.sample_euler)(D, x_T, fine1[: K1 * (k + 1) + 1]))
    # DPM-Solver++(3M) (the default teacher) tracks the exact ODE at every student time ...
    states = sfd.teacher_states(D, x_T, fine, K, "dpm3m")
    assert torch.equal(states[-1], common.sample_dpmpp(D, x_T, fine, order=3))
    rel_err = lambda x_k, k: ((x_k - exact_ode(x_T, 80.0, float(t[k + 1]))).abs().max()
                              / exact_ode(x_T, 80.0, float(t[k + 1])).abs().max()).item()
    assert all(rel_err(x_k, k) < 2e-2 for k, x_k in enumerate(states)) and rel_err(states[-1], len(t) - 2) < 1e-3
    # ... and at t_min the slides' ranking of teachers holds: DPM++(3M) > DPM(2S) > Heun > DDIM (Euler).
    final = [rel_err(sfd.teacher_states(D, x_T, fine, K, s)[-1], len(t) - 2) for s in ("dpm3m", "dpm2s", "heun", "euler")]
    assert final == sorted(final), final


# --- Alg. 2: the student steps from its own detached state, one update per step ----------------

def alg2_batch(seed=1):
    """A student, a teacher (another small net), a batch of noise and the teacher's states, for the Alg. 2 tests."""
    D = common.Denoiser(common.student_from(small_net()))
    teacher = common.Denoiser(small_net(seed=7)).eval().requires_grad_(False)
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    t = sfd.student_grid(4)
    x_tilde = sfd.teacher_states(teacher, 80.0 * eps, sfd.teacher_grid(t, 4), 4, "dpm3m")
    return D, teacher, eps, t, x_tilde


def euler_by_hand(D, x, t_cur, t_next):
    """Alg. 2 line 3 written out (the reference of the tests below, independent of sfd.euler_step): one Euler step of
    the probability-flow ODE with the slope at the current level, x + (t_next - t_cur)*(x - D(x, t_cur))/t_cur."""
    return x + (t_next - t_cur) * (x - D(x, t_cur)) / t_cur


def test_gradients_flow_only_through_the_current_student_step():
    D, teacher, eps, t, x_tilde = alg2_batch()
    params = list(D.parameters())
    recorded, losses = [], []
    for loss in sfd.sfd_loss(D, teacher, eps, None, [4], torch.Generator()):   # no optimizer step: psi stays fixed
        recorded.append([g.clone() for g in torch.autograd.grad(loss, params)])
        losses.append(loss.item())
    assert len(recorded) == len(t) - 2                   # an optimizer step per student network step, none for AFS
    # Independent computation: the student's states without any graph, then each step's loss alone.
    x_T = 80.0 * eps
    with torch.no_grad():
        xs = [x_T, x_T + (float(t[1]) - 80.0) * x_T / math.sqrt(1 + 80.0**2)]          # AFS
        for k in range(1, len(t) - 1):
            xs.append(euler_by_hand(D, xs[-1], float(t[k]), float(t[k + 1])))
    assert (xs[-1] - x_tilde[-1]).abs().max() > 1e-3     # the student is not the teacher: the losses are not zero
    for k in range(1, len(t) - 1):
        loss = (euler_by_hand(D, xs[k], float(t[k]), float(t[k + 1])) - x_tilde[k]).abs().mean()     # L1 to x~_n
        assert abs(loss.item() - losses[k - 1]) < 1e-6
        for g_alg, g_ref in zip(recorded[k - 1], torch.autograd.grad(loss, params)):
            assert torch.allclose(g_alg, g_ref, rtol=1e-5, atol=1e-8)
    # Had the state not been detached, step k's gradient would also flow through steps 1..k-1:
    x = xs[1]
    for k in range(1, len(t) - 1):
        x = euler_by_hand(D, x, float(t[k]), float(t[k + 1]))      # no detach
    leaky = torch.autograd.grad((x - x_tilde[-1]).abs().mean(), params)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(leaky, recorded[-1]))


def test_each_student_step_runs_the_updated_student():
    """Alg. 2 line 5 inside the loop over n: the loop's optimizer_steps takes one step per yielded loss, and the
    next student step runs the updated psi from the detached state (written out by hand with SGD)."""
    D, teacher, eps, t, x_tilde = alg2_batch()
    ref = common.Denoiser(common.student_from(small_net()))
    opt, opt_ref = torch.optim.SGD(D.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    values, _ = common.optimizer_steps(common.Dist("cpu"), sfd.sfd_loss(D, teacher, eps, None, [4], torch.Generator()),
                                       opt, list(D.parameters()))
    x, by_hand = sfd.afs_step(80.0 * eps, float(t[0]), float(t[1])), []
    for k in range(1, len(t) - 1):
        x_psi = euler_by_hand(ref, x, float(t[k]), float(t[k + 1]))
        loss = (x_psi - x_tilde[k]).abs().mean()
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()
        by_hand.append(loss.item())
        x = x_psi.detach()
    values = [v.item() for v in values]                # device tensors: train_loop reads them once per interval
    assert values == pytest.approx(by_hand, rel=1e-5) and len(set(values)) == len(values)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(D.parameters(), ref.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(D.parameters(), common.student_from(small_net()).parameters()))


def test_distances():
    a, b = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.isclose(sfd.distance("l1", a, b), (a - b).abs().mean())
    assert torch.isclose(sfd.distance("l2", a, b), ((a - b) ** 2).mean())
    c = 0.00054 * 8
    for scale in (1.0, 1e-4):                            # at 1e-4 per pixel (|a - b|^2 << c^2) c itself matters
        ref = torch.stack([((scale * (a[i] - b[i])).double().norm() ** 2 + c**2).sqrt() - c for i in range(4)]).mean()
        assert torch.isclose(sfd.distance("huber", scale * a, scale * b).double(), ref, rtol=1e-4, atol=0)


# --- SFD-v: the step condition ----------------------------------------------------------------

def test_sfdv_condition_is_a_no_op_at_init():
    net = small_net()
    teacher = common.Denoiser(net).eval()
    ch = net.config["ch"]
    student = common.Denoiser(common.student_from(net, cond_dim=4 * ch)).eval()
    embed = sfd.StepEmbedding(4 * ch, ch)
    x, sigma = torch.randn(3, 1, 32, 32) * 5, torch.tensor([0.1, 2.0, 30.0])
    with torch.no_grad():
        ref = teacher(x, sigma)
        outs = {n: student(x, sigma, embed(n, 3, "cpu")) for n in (2, 3, 4, 5)}
        for n, out in outs.items():
            assert torch.equal(out, ref), n
        # Once the zero-initialised maps move, the NFE does change the output (the condition is wired in).
        for m in student.modules():
            if isinstance(m, common.ResBlock) and m.cond is not None:
                m.cond.weight.normal_(0, 0.1)
        assert not torch.allclose(student(x, sigma, embed(2, 3, "cpu")), student(x, sigma, embed(5, 3, "cpu")))


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("nfe", ["0", "-1", "2.5", "abc", "17", "1,2", "3,,4"])
def test_bad_nfe_is_one_line(nfe, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sfd.py", "--preset", "smoke", f"--nfe={nfe}", "--teacher", "missing.pt"])
    with pytest.raises(SystemExit) as e:
        common.main_guard(sfd.main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --nfe"), err
    assert not (tmp_path / "runs").exists()


def test_bad_nfe_subprocess(tmp_path):
    r = run_script("sfd.py", "--preset", "smoke", "--nfe", "0", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--nfe" in r.stderr, r.stderr


def smoke_args(fashion_dir, smoke_teacher, out, *extra):
    return ["--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher, "--out", out, *extra]


def test_smoke_end_to_end_and_second_stage_init(fashion_dir, smoke_teacher, tmp_path):
    # First stage at NFE 5 (it is also the default first-stage folder of the run below: <out's parent>/sfd-nfe5).
    r = run_script("sfd.py", *smoke_args(fashion_dir, smoke_teacher, tmp_path / "sfd-nfe5", "--nfe", "5"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "sfd-nfe5" / "metrics.json").read_text())
    for key in ("method", "variant", "dataset", "preset", "nfe", "fid", "fid_n", "teacher_fid_dpm3m", "teacher_fid_euler",
                "train_seconds", "images_seen", "teacher_rms", "teacher_rms_dpm3m", "teacher_rms_euler"):
        assert key in m, key
    assert m["method"] == "sfd" and m["nfe"] == 5 and m["images_seen"] == 8
    assert (tmp_path / "sfd-nfe5" / "samples.png").exists()
    rows = check_run_pictures(tmp_path / "sfd-nfe5", ["sfd"])
    ck = torch.load(tmp_path / "sfd-nfe5" / "student.pt", weights_only=True)
    assert [[float(v) for v in r[1:]] for r in rows[1:]] == [[float(v) for v in r] for r in ck["curve"]]
    assert r.stdout.strip().splitlines()[-1].startswith("sfd fashion NFE 5: student")
    stage1 = torch.load(tmp_path / "sfd-nfe5" / "student.pt", weights_only=True)
    teacher = torch.load(smoke_teacher, weights_only=True)["ema"]
    assert any(not torch.equal(stage1["net"][k], teacher[k]) for k in teacher)      # stage 1 did train

    # Second stage with lr 0: its student must still hold exactly the first stage's weights.
    mtime = (tmp_path / "sfd-nfe5" / "student.pt").stat().st_mtime
    r = run_script("sfd.py", *smoke_args(fashion_dir, smoke_teacher, tmp_path / "sfd-nfe1", "--nfe", "1", "--lr-2", "0"),
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "sfd-nfe5" / "student.pt").stat().st_mtime == mtime            # reused, not retrained
    stage2 = torch.load(tmp_path / "sfd-nfe1" / "student.pt", weights_only=True)
    assert all(torch.equal(stage2["net"][k], stage1["net"][k]) for k in stage1["net"])
    m = json.loads((tmp_path / "sfd-nfe1" / "metrics.json").read_text())
    assert m["variant"] == "sfd-stage2" and m["nfe"] == 1 and m["student_grid"][0] == 80.0 and len(m["student_grid"]) == 3


def test_resume_equals_uninterrupted_run(fashion_dir, smoke_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(out, *extra):
        monkeypatch.setattr(sys, "argv", ["sfd.py", *map(str, smoke_args(fashion_dir, smoke_teacher, out, "--nfe", "2,3",
                                                                          "--trajectories-v", "16", *extra))])
        sfd.main()
        return torch.load(tmp_path / out / "student.pt", weights_only=True)

    full = run("a", "--stop-after", "12")
    run("b", "--stop-after", "4")
    resumed = run("b", "--stop-after", "12", "--resume")
    assert resumed["done"] == full["done"] == 12 and not resumed["finished"]
    assert torch.equal(resumed["nfe_rng"], full["nfe_rng"])                     # SFD-v's NFE draw continues too
    for part in ("net", "embed"):
        for k in full[part]:
            assert torch.equal(full[part][k], resumed[part][k]), (part, k)
    # Finishing the SFD-v run evaluates every NFE: one folder (one metrics.json row) per NFE, and the
    # list of all of them in metrics-all.json, which the table printer does not read.
    finished = run("b", "--resume")
    assert finished["finished"] and finished["done"] == 16 and finished["settings"]["trajectories"] == 16
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert [json.loads((tmp_path / "b" / f"nfe{n}" / "metrics.json").read_text())["nfe"] for n in (2, 3)] == [2, 3]
    metrics = json.loads((tmp_path / "b" / "metrics-all.json").read_text())
    assert [m["nfe"] for m in metrics] == [2, 3] and all(m["variant"] == "sfd-v" and "teacher_rms" in m for m in metrics)
    assert all((tmp_path / "b" / f"nfe{n}" / "samples.png").exists() for n in (2, 3))
    assert (tmp_path / "b" / "samples.png").exists()


def test_torchrun_two_processes_trains_first_stage_then_second(fashion_dir, smoke_teacher, tmp_path):
    r = run_script("sfd.py", *smoke_args(fashion_dir, smoke_teacher, tmp_path / "sfd-nfe1", "--nfe", "1"),
                   cwd=tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "sfd-nfe5" / "metrics.json").read_text())["nfe"] == 5      # stage 1 trained first
    assert json.loads((tmp_path / "sfd-nfe1" / "metrics.json").read_text())["nfe"] == 1
    assert "sfd-stage2 fashion NFE 1: student" in r.stdout.strip().splitlines()[-1]


# --- --resume refuses changed settings; the run name tells thresholded runs apart ----------------

def test_run_name_tells_thresholding_apart():
    base = sfd.parse_args(["--nfe", "4"])
    assert sfd.run_name(base, [4]) == "sfd-nfe4"
    flip = "--no-teacher-threshold" if sfd.TEACHER_THRESHOLD else "--teacher-threshold"
    other = sfd.parse_args(["--nfe", "4", flip])
    assert sfd.thresholded(other) != sfd.thresholded(base)
    assert sfd.run_name(other, [4]) == "sfd-nfe4-" + ("nothr" if sfd.TEACHER_THRESHOLD else "thr")
    assert sfd.run_settings(other, [4])["threshold"] != sfd.run_settings(base, [4])["threshold"]
    euler = sfd.parse_args(["--nfe", "4", "--teacher-solver", "euler", "--teacher-threshold"])
    assert not sfd.thresholded(euler) and sfd.run_name(euler, [4]) == "sfd-nfe4-euler"   # only dpm3m thresholds


def test_preset_flags_per_variant():
    """Each training length and lr has its flag (--help shows the lab and paper values); a flag sets only its
    own variant's (SFD and the first stage: --lr, --trajectories; SFD-v: --trajectories-v; 2nd stage: *-2)."""
    smoke = sfd.PRESETS["smoke"]
    args = sfd.parse_args(["--preset", "smoke", "--trajectories-v", "16", "--lr-2", "0"])
    assert [sfd.run_settings(args, n)["trajectories"] for n in ([4], [2, 3], [1])] == [smoke["trajectories"], 16,
                                                                                        smoke["trajectories_2"]]
    assert [sfd.run_settings(args, n)["lr"] for n in ([4], [2, 3], [1])] == [smoke["lr"], smoke["lr"], 0.0]
    assert sfd.run_settings(args, [1])["solver"] == "euler+afs" and sfd.run_settings(args, [1])["K"] == 3


def test_help_shows_the_preset_values(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sfd.py", "--help"])
    with pytest.raises(SystemExit):
        sfd.parse_args()
    out = " ".join(capsys.readouterr().out.split())
    assert "lab 7,040, paper 800,000" in out and "lab 0.0005, paper 0.0005" in out and "lab 0.0002, paper 5e-05" in out


@pytest.mark.parametrize("change,key", [(["--teacher-solver", "euler"], "solver"), (["--teacher-steps", "2"], "K"),
                                        (["--loss", "l2"], "loss"), (["--lr", "1e-3"], "lr"),
                                        (["--batch-size", "2"], "batch"), (["--trajectories", "12"], "trajectories"),
                                        (["--teacher-threshold"], "threshold"), (["--no-teacher-threshold"], "threshold")])
def test_resume_refuses_changed_settings(change, key, fashion_dir, smoke_teacher, tmp_path, monkeypatch, capsys):
    """pd.py's chain check for SFD: every setting the student depends on is in student.pt; another is one error line,
    and the checkpoint keeps the settings it was trained with."""
    monkeypatch.chdir(tmp_path)
    first = ["--teacher-threshold"] if change == ["--no-teacher-threshold"] else []
    argv = lambda *extra: ["sfd.py", *map(str, smoke_args(fashion_dir, smoke_teacher, "run", "--nfe", "2", "--trajectories",
                                                          "8", "--stop-after", "4", *extra))]
    monkeypatch.setattr(sys, "argv", argv(*first))
    sfd.main()
    before = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    capsys.readouterr()
    assert before["settings"]["trajectories"] == 8 and before["settings"]["threshold"] == bool(first)
    monkeypatch.setattr(sys, "argv", argv("--resume", *change))
    with pytest.raises(SystemExit) as e:
        common.main_guard(sfd.main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and f"{key} " in err[0], err
    after = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert after["settings"] == before["settings"] and after["done"] == 4


# --- DPM-Solver++(3M)'s order rule: the SFD authors' (sfd-main/solvers.py, dpm_pp_sampler) --------------------

def test_dpmpp_order_rule_is_the_authors():
    """order = i + 1 while i + 1 < max_order, else min(max_order, n - i): 3M on 2 steps is [1, 2], not Euler."""
    authors = {1: [1], 2: [1, 2], 3: [1, 2, 1], 4: [1, 2, 2, 1], 5: [1, 2, 3, 2, 1], 6: [1, 2, 3, 3, 2, 1]}
    assert {n: [common.dpmpp_order(i, n, 3) for i in range(n)] for n in authors} == authors
    assert [common.dpmpp_order(i, 2, 2) for i in range(2)] == [1, 1]            # 2M on 2 steps: Euler's orders
    # On 2 steps, the second step is DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) from the first step's D, by hand:
    torch.manual_seed(0)
    D, x = gaussian_denoiser(var=0.5**2), 80.0 * torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t0, t1, t2 = 80.0, 2.0, 0.05
    D0 = D(x, t0)
    x1 = (t1 / t0) * x + (1 - t1 / t0) * D0                                     # order 1 (= Euler)
    h, h_prev = math.log(t1 / t2), math.log(t0 / t1)
    D_2m = (1 + h / (2 * h_prev)) * D(x1, t1) - h / (2 * h_prev) * D0              # 2M's D: 1 + 1/(2r), r = h_prev/h
    x2 = (t2 / t1) * x1 + (1 - t2 / t1) * D_2m
    sigmas = torch.tensor([t0, t1, t2], dtype=torch.float64)
    out = common.sample_dpmpp(D, x, sigmas, order=3)
    assert torch.allclose(out, x2, rtol=1e-12)
    assert (out - common.sample_euler(D, x, sigmas)).abs().max() > 1e-3


# --- The ablation solvers against direct computations; the paper preset; what main builds -------------------------

def test_dpm2s_step_by_hand():
    """DPM-Solver-2 (the slides' DPM(2S)) written out: Euler to t_mid = sqrt(t*t_next), then the whole step with the
    midpoint's slope; and the table of teacher solvers: each name runs what it says with its calls per step."""
    D, x = gaussian_denoiser(0.1, 0.25), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t, t2 = 10.0, 2.5
    t_mid = 5.0                                                              # sqrt(10 * 2.5)
    x_mid = x + (t_mid - t) * (x - D(x, t)) / t
    assert torch.allclose(sfd.sample_dpm2s(D, x, [t, t2]), x + (t2 - t) * (x_mid - D(x_mid, t_mid)) / t_mid, rtol=1e-12)
    grid, calls = sfd.student_grid(4), []
    ref = {"euler": lambda: common.sample_euler(D, x, grid), "heun": lambda: common.sample_heun(D, x, grid),
           "dpm2s": lambda: sfd.sample_dpm2s(D, x, grid), "dpm3m": lambda: common.sample_dpmpp(D, x, grid, order=3),
           "euler+afs": lambda: common.sample_euler(D, sfd.afs_step(x, float(grid[0]), float(grid[1])), grid[1:])}
    for name, (sampler, per_step) in sfd.TEACHER_SOLVERS.items():
        calls.clear()
        out = sampler(gaussian_denoiser(0.1, 0.25, calls), x, grid)
        assert len(calls) == per_step * (len(grid) - 1) - (name == "euler+afs") and torch.equal(out, ref[name]()), name
    assert not torch.allclose(sfd.TEACHER_SOLVERS["dpm3m"][0](D, x, grid), common.sample_dpmpp(D, x, grid, order=2))


# (key, value, source: zju-pi/diff-sampler sfd-main/launch.sh's CIFAR-10 runs and sfd-main/train.py's defaults)
PAPER = [("batch", 128, "launch.sh --batch=128"), ("lr", 5e-5, "launch.sh --lr=5e-5 (SFD, SFD-v)"),
         ("trajectories", 200_000, "launch.sh --total_kimg=200"), ("trajectories_v", 800_000, "--total_kimg=800 (SFD-v)"),
         ("trajectories_2", 2_000_000, "--total_kimg=2000 (second stage)"), ("lr_2", 5e-4, "--lr=5e-4 (second stage)"),
         ("teacher_solver", "dpm3m", "train.py --sampler_tea dpmpp, max_order 3"), ("teacher_steps", 4, "train.py --M 3"),
         ("no_afs", False, "train.py --afs True"), ("t_min", 0.006, "the paper's t_min"), ("loss", "l1", "loss.py: L1"),
         ("teacher_threshold", False, "deviation: the authors always threshold (header)")]


@pytest.mark.parametrize("key,value,source", PAPER)
def test_paper_preset_values(key, value, source):
    assert getattr(sfd.parse_args(["--preset", "paper"]), key) == value, source
    assert sfd.FIRST_STAGE_NFE == 5                                          # the second stage's teacher: NFE 5


def test_main_builds_adam_the_lr_drop_and_samples_with_euler_afs(random_teacher, tmp_path, monkeypatch):
    """What sfd.main hands the loop and the report (MainSpy): Adam at --lr (betas 0.9/0.999, eps 1e-8), no clipping,
    lr/10 from half the run on; the student psi a copy of the teacher, in train mode; Alg. 2 with the dpm3m teacher
    (K = 4, not thresholded), AFS, L1, t_min 0.006; the report samples the student in eval mode with Euler + AFS."""
    monkeypatch.chdir(tmp_path)
    spy = MainSpy(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["sfd.py", "--preset", "smoke", "--nfe", "4", "--teacher", str(random_teacher),
                                      "--out", str(tmp_path / "run")])
    sfd.main()
    (loop,), (rep,) = spy.loops, spy.reports
    opt, D, teacher = loop["opt"], loop["student"], common.load_denoiser(random_teacher)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.Adam
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 0)
    b = loop["budget"]
    assert (b.total, b.unit, b.batch, b.lr, b.clip) == (8, "trajectories", 4, 1e-4, None)
    assert [b.schedule(1.0, done, 8) for done in (0, 3, 4, 7)] == [1.0, 1.0, 0.1, 0.1]
    assert D.net is loop["nets"]["net"] and loop["student_training"] and loop["training"]["net"]
    assert all(torch.equal(v, teacher.net.state_dict()[k]) for k, v in loop["states"]["net"].items())
    assert loop["teacher"].source == str(random_teacher) and loop["data"] == (1, 32, 32)
    eps = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    D.eval()                                                                  # no dropout noise in this comparison
    ours = [v.item() for v in loop["loss"](D, teacher, eps, None)]
    ref = [v.item() for v in sfd.sfd_loss(D, teacher, eps, None, [4], torch.Generator(), None, 4, "dpm3m", True, "l1", 0.006)]
    assert ours == ref and len(ours) == 4
    assert rep["training"][id(D.net)] is False
    grid = sfd.student_grid(4, 0.006, True)
    with torch.no_grad():
        expected = common.sample_euler(D, sfd.afs_step(80.0 * eps, float(grid[0]), float(grid[1])), grid[1:])
    assert torch.equal(rep["sample_fn"](eps), expected)
    assert {k: rep["info"][k] for k in ("teacher_solver", "teacher_steps_K", "t_min", "afs", "loss", "teacher_threshold")} \
        == dict(teacher_solver="dpm3m", teacher_steps_K=4, t_min=0.006, afs=True, loss="l1", teacher_threshold=False)
