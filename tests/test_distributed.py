"""The paper path on several processes and on a GPU, proven on the CPU (issue 29): the evaluation split over the
ranks gives one process's numbers, a collective timeout is one line, one process downloads while the others
wait, a fault on one rank ends every rank, the precision of each part under bf16 autocast, no host sync or
host-to-device copy inside the samplers' and losses' loops, the instant refusal of a paper run without CUDA
and its counted FLOPs. Several processes: torchrun with gloo (tests/dist_script.py holds the scenarios)."""
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import cd
import cfd
import common
import pd
import sfd
import sfddm
import sferd
from conftest import ROOT, run_script

EDM_PKL = ROOT / "tests" / "data" / "edm-tiny-uncond.pkl"


def torchrun(*args, cwd, timeout_s=None, timeout=600):
    """tests/dist_script.py on two processes (gloo), FEWSTEP_DIST_TIMEOUT=timeout_s if given."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if timeout_s is not None:
        env["FEWSTEP_DIST_TIMEOUT"] = str(timeout_s)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_script.py"), *map(str, args)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t0


# --- 1. Evaluation over every rank: two processes score as one -------------------------------------------

@pytest.mark.fid
def test_two_processes_evaluate_and_export_like_one(fashion_dir, smoke_teacher, tmp_path):
    """The same student evaluated by one process and by two (torchrun): the same metrics.json, FIDs to float64
    rounding (the Inception sums are added over the ranks), every sample-wise figure exactly (the images are one
    process's), the same export; each rank made half of the images. The two-process run has its own teacher copy
    and runs/ folder, so its teacher baselines and reference statistics are made split too."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    (two / "teacher").mkdir(parents=True)
    shutil.copy(smoke_teacher, two / "teacher" / "teacher.pt")      # same content: a fresh eval/ cache beside it
    flags = ["--preset", "smoke", "--data-dir", fashion_dir, "--fid-samples", 8, "--batch-size", 4, "--export", 12,
             "--export-format", "npz"]
    r = run_script("sfd.py", *flags, "--teacher", smoke_teacher, "--out", one / "run", cwd=one, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    (two / "run").mkdir()
    shutil.copy(one / "run" / "student.pt", two / "run" / "student.pt")        # the finished student: evaluated again
    r = run_script("sfd.py", *flags, "--teacher", two / "teacher" / "teacher.pt", "--out", two / "run", "--resume",
                   cwd=two, timeout=1800, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "run" / "metrics.json").read_text()) for d in (one, two))
    assert b.pop("eval_images_per_rank") == [128, 128]     # student + 35-NFE + DPM++(3M) + Euler baselines: 4 x 64 / 2
    assert "eval_images_per_rank" not in a                 # one process: metrics.json as before
    for key in ("command", "teacher", "img_per_s"):
        a.pop(key, None), b.pop(key, None)
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        if key.startswith("fid") and "n" not in key or key.startswith("teacher_fid"):
            assert value is not None and abs(b[key] - value) < 1e-6 * max(1.0, abs(value)), key
        else:
            assert b[key] == value, key
    with np.load(one / "run" / "samples-12.npz") as x, np.load(two / "run" / "samples-12.npz") as y:
        assert np.array_equal(x["arr_0"], y["arr_0"])


# --- 2. A collective timeout: the old design fails, the split one passes -----------------------------------

def test_evaluation_longer_than_the_timeout_passes_only_when_split(tmp_path):
    """8 s of evaluation, a 3 s collective timeout: rank 0 alone with the others in a barrier (fid.report's old
    design) ends with one line naming the waiting rank and FEWSTEP_DIST_TIMEOUT; the split design finishes."""
    r, _ = torchrun("evaluate", "old", cwd=tmp_path, timeout_s=3)
    assert r.returncode != 0 and r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert "error: rank 1 waited more than 3 s for the other processes" in r.stderr
    assert "FEWSTEP_DIST_TIMEOUT=<seconds>" in r.stderr
    r, _ = torchrun("evaluate", "split", cwd=tmp_path, timeout_s=3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(r.stdout.split("\n"))[-4:] == ["rank 0: evaluated", "rank 0: made 4 of 8", "rank 1: evaluated",
                                                 "rank 1: made 4 of 8"]                # each made half, as one process


def test_dist_timeout_is_read_from_the_environment(monkeypatch):
    assert common.dist_timeout() == common.DIST_TIMEOUT == 1800
    monkeypatch.setenv("FEWSTEP_DIST_TIMEOUT", "2.5")
    assert common.dist_timeout() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("FEWSTEP_DIST_TIMEOUT", bad)
        with pytest.raises(common.UserError, match="FEWSTEP_DIST_TIMEOUT"):
            common.Dist("cpu")


# --- 3. One download, every rank waits for it; a truncated file is refused ---------------------------------

class Server:
    """A local HTTP server on 127.0.0.1 serving `body` for every path and counting the GETs."""

    def __init__(self, body):
        self.body, self.gets = body, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.gets += 1
                time.sleep(0.5)                     # a download that takes a while: the other rank must wait for it
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/edm/"

    def close(self):
        self.httpd.shutdown()


def test_one_process_downloads_and_every_rank_loads(tmp_path):
    params = common.count_params(common.load_denoiser(EDM_PKL).net)      # the stand-in's "published" size
    server = Server(EDM_PKL.read_bytes())
    try:
        r, _ = torchrun("fetch", server.url, params, tmp_path / "cache", cwd=tmp_path)
    finally:
        server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.gets == 1 and r.stderr.count("downloading ") == 1
    assert sorted(r.stdout.split("\n"))[-2:] == [f"rank 0: loaded {params} parameters", f"rank 1: loaded {params} parameters"]
    cached = tmp_path / "cache" / "edm-cifar10-32x32-uncond-vp.pkl"
    assert cached.read_bytes() == EDM_PKL.read_bytes() and not cached.with_name(cached.name + ".part").exists()


def test_truncated_download_is_one_line_and_never_cached(tmp_path):
    params = common.count_params(common.load_denoiser(EDM_PKL).net)
    raw = EDM_PKL.read_bytes()
    for body, why in ((raw[:len(raw) // 2], "truncated or not an EDM snapshot"), (raw, f"not the published {params + 1:,}")):
        server = Server(body)
        try:
            r, _ = torchrun("fetch", server.url, params + (why != "truncated or not an EDM snapshot"), tmp_path / "cache",
                            cwd=tmp_path)
        finally:
            server.close()
        assert r.returncode != 0 and r.stderr.count("error: ") == 1, r.stderr[-3000:]
        line = next(line for line in r.stderr.splitlines() if "error: " in line)
        assert "the download of " + server.url in line and "unusable, so it was not kept" in line and why in line, line
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["edm-cifar10-32x32-uncond-vp.pkl.lock"]   # no .pkl


# --- 4. A fault on one rank ends every rank -------------------------------------------------------------------

def test_nan_on_one_rank_ends_every_rank_with_one_line(tmp_path):
    """The loss turns NaN on rank 1 only: both ranks stop at the next read of the losses, long before the 300 s
    collective timeout a waiting rank would run into, and rank 0 prints one line naming rank 1 (so both ranks
    learnt of it: rank 1 prints nothing itself). Both exit 2, or the later one is ended by torchrun first."""
    r, seconds = torchrun("nan", tmp_path, cwd=tmp_path, timeout_s=300)
    assert r.returncode != 0 and r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert "error: loss is nan (not finite) on rank 1 of 2: lower the learning rate" in r.stderr
    assert "exitcode  : 2" in r.stderr and seconds < 240
    assert not (tmp_path / "ck.pt").exists()                            # nothing NaN was saved


def test_gradients_are_averaged_in_buckets_during_backward(tmp_path):
    """Dist.grad_sync (the all-reduce overlapped with backward that replaces the flat one after it): each gradient
    is the mean of every rank's own, over several buckets; unused and frozen parameters keep no gradient."""
    r, _ = torchrun("grads", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(r.stdout.split("\n"))[-2:] == ["rank 0: 5 buckets averaged", "rank 1: 5 buckets averaged"]


def test_several_processes_refuse_one_gpu_index(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(common.UserError, match="--device cuda:1 with 2 processes would put them all on one GPU: pass "
                                               "--device cuda"):
        common.Dist("cuda:1")


# --- 5. Precision: the teacher in fp32, the trained networks in bf16, attention logits in fp32 ------------------

def test_cd_loss_under_bf16_autocast_gives_every_parameter_a_gradient(smoke_teacher):
    """cd_loss runs the target network under no_grad and then the student with grad in one autocast region (the
    case of pytorch#112583): with common.autocast's bf16 (on the CPU through its own enabled=True) every trained
    parameter gets a non-zero gradient, the student's convolutions run in bf16, the frozen teacher's in fp32,
    and the attention probabilities are fp32."""
    D = common.load_denoiser(smoke_teacher)
    f, f_target, _ = cd.consistency_nets(D, 0.9)
    dtypes = {}
    for name, net in (("student", f.net), ("target", f_target.net), ("teacher", D.net)):
        net.conv_in.register_forward_hook(lambda m, i, out, name=name: dtypes.setdefault(name, out.dtype) and None)
    sigmas, gen = common.karras_sigmas(18).float(), torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1
    with common.autocast("cpu", enabled=True):
        loss = cd.cd_loss(f, D, x0, gen, f_target=f_target, sigmas=sigmas, metric="pseudo-huber")
        _, extras = f.net(x0, torch.zeros(4), attn=f.net.attn_names[0])
    loss.backward()
    assert dtypes == {"student": torch.bfloat16, "target": torch.bfloat16, "teacher": torch.float32}
    assert extras["attn"].dtype == torch.float32
    missing = [n for n, p in f.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and len(list(f.parameters())) > 20, missing


# --- 6. The GPU's loops: no host sync, no host-to-device copy per step --------------------------------------------

class HostTraffic(TorchDispatchMode):
    """Counts host-to-device copies (a tensor copied from the CPU to another device, or made there from Python
    numbers) while it is active. On the meta device a host sync (item, tolist, bool of a tensor) raises."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device") or src.device
            self.copies += src.device.type == "cpu" and torch.device(dst).type != "cpu"
        return func(*args, **kwargs)


class FactoryCopies(TorchFunctionMode):
    """torch.tensor / as_tensor of Python data onto another device: a host-to-device copy below the dispatcher."""

    def __init__(self, traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and not torch.is_tensor(args[0]) and \
                torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.traffic.copies += 1
        return func(*args, **kwargs)


def host_copies(fn):
    traffic = HostTraffic()
    with FactoryCopies(traffic), traffic:
        fn()
    return traffic.copies


def meta_denoiser():
    with torch.device("meta"):
        return common.Denoiser(common.UNet(in_ch=1, res=32, **common.NET_CONFIGS["smoke"]))


def test_samplers_make_no_host_copy_or_sync():
    """Every sampler of an evaluation, on the meta device: no host sync (it would raise); no host-to-device copy
    in common's and SFD's (as_batch fills a Python sigma in on the device), and PD's and SFDDM's schedules and
    CD's and SFDDM's step noise moved once per call, whatever the number of steps."""
    D, x = meta_denoiser(), torch.randn(2, 1, 32, 32, device="meta")
    for name, sampler in common.SAMPLERS.items():
        for nfe in (3, 5):
            assert host_copies(lambda: sampler(D, x * 80, common.teacher_sigmas("euler", nfe))) == 0, name
    for nfe in (2, 4):
        assert host_copies(lambda: sfd.TEACHER_SOLVERS["euler+afs"][0](D, x * 80, sfd.student_grid(nfe))) == 0
        assert host_copies(lambda: sfd.sample_dpm2s(D, x * 80, sfd.student_grid(nfe))) == 0
    assert host_copies(lambda: pd.sample_ddim(D, x, 2)) == host_copies(lambda: pd.sample_ddim(D, x, 8)) == 1
    chains = [sfddm.student_alpha_bar(sfddm.teacher_alpha_bar(64), sfddm.subsequence(64, k)) for k in (2, 8)]
    assert [host_copies(lambda: sfddm.sample_ddim(D, x, a)) for a in chains] == [1, 1]
    assert [host_copies(lambda: sfddm.phi_samplers(D, a, True)["alg2"](x)) for a in chains] == [2, 2]
    f, noise = cd.ConsistencyFunction(D.net), common.PerSampleNoise(0, range(2), "meta")
    for taus in ([], [2.0], [2.0, 0.5, 0.1]):                          # [] : one step, no re-noising
        assert host_copies(lambda: cd.sample_cd(f, x * 80, taus, noise.ahead(len(taus), 1, 32, 32))) == min(len(taus), 1)


def test_losses_copy_a_fixed_number_of_tensors_whatever_their_steps():
    """A loss's host-to-device copies (its random draws) do not grow with its inner steps: PD's teacher steps n,
    SFD's student and teacher steps; no host sync inside (meta device)."""
    D, x = meta_denoiser(), torch.rand(2, 1, 32, 32, device="meta")
    gen = lambda: torch.Generator().manual_seed(0)
    pd_copies = [host_copies(lambda n=n: pd.pd_loss(D, D, x, gen(), 4, xflip=True, n=n)) for n in (2, 4, 8)]
    assert len(set(pd_copies)) == 1 and pd_copies[0] <= 5, pd_copies
    sfd_copies = [host_copies(lambda n=n: list(sfd.sfd_loss(D, D, x, None, [n], gen()))) for n in (2, 4)]
    assert sfd_copies == [0, 0]
    sigmas = common.karras_sigmas(18).float().to("meta")
    f = cd.ConsistencyFunction(D.net)
    assert host_copies(lambda: cd.cd_loss(f, D, x, gen(), f_target=f, sigmas=sigmas, metric="l2")) <= 2


def test_train_loop_reads_the_device_only_once_per_interval(monkeypatch, tmp_path):
    """train_loop on the meta device, where any read of a device value raises: it runs because the losses are
    only read by settle (stubbed here), once per logging interval of min(window, SETTLE_EVERY) steps."""
    reads = []

    def settle(pg, s, pending, window, total, signum=None):
        reads.append([p[0] for p in pending])
        pending.clear()
        return {}, 0

    monkeypatch.setattr(common, "settle", settle)
    monkeypatch.setattr(common, "save_checkpoint", lambda *a, **k: None)
    with torch.device("meta"):
        net = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    pg = common.Dist("meta")
    budget = common.Budget(total=600, unit="updates", batch=2, lr=1e-3, ckpt_every=1000, clip=1.0)
    run = common.train_loop(pg, lambda s, _, x, g: (s(x) ** 2).mean(), (4,), net, None, opt, budget,
                            common.Run(tmp_path / "ck.pt", "meta-test", {}, dict(net=net), torch.Generator()))
    window = 600 // 100                                                  # about 100 loss.csv rows
    expected = [list(range(k - window + 1, k + 1)) for k in range(window, 601, window)]
    assert run["step"] == 600 and [r for r in reads if r] == expected


def test_settle_books_the_losses_as_one_read_per_step_would():
    """The loss curve and running averages from losses read in one go equal those of reading each step."""
    pg, s = common.Dist("cpu"), dict(loss_start=None, loss_avg=None, curve=[], acc={})
    losses = [torch.tensor(v) for v in (0.5, 0.25, 0.125, 1.0, 2.0)]
    pending = [(k + 1, 4 * (k + 1), k + 1, [v], {"part": v * 2}) for k, v in enumerate(losses)]
    assert common.settle(pg, s, pending, window=2, total=5) == ({"loss": 2.0, "part": 4.0}, 0) and pending == []
    assert s["loss_start"] == 0.5 and s["curve"] == [[8, 0.375, 0.75], [16, 0.5625, 1.125], [20, 2.0, 4.0]]
    assert s["loss_avg"] == 0.95 * (0.95 * (0.95 * (0.95 * 0.5 + 0.05 * 0.25) + 0.05 * 0.125) + 0.05 * 1.0) + 0.05 * 2.0
    assert common.settle(pg, s, [(6, 24, 6, [torch.tensor(0.5)], {})], 2, 10, signum=15) == ({"loss": 0.5}, 15)
    with pytest.raises(common.UserError, match=r"^loss is inf \(not finite\): lower the learning rate"):
        common.settle(pg, s, [(6, 24, 6, [torch.tensor(float("inf"))], {})], window=2, total=10)


def test_prepare_applies_channels_last_and_compile_once(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    net = common.UNet(in_ch=1, res=32, **common.NET_CONFIGS["smoke"])
    pg = common.Dist("cpu", compile=True, channels_last=True)
    assert pg.prepare(pg.prepare(net)) is net and compiled == [net]
    weight = net.conv_out.weight                                        # 16 input channels: NHWC differs from NCHW
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    common.Dist("cpu").prepare(common.UNet(in_ch=1, res=32, **common.NET_CONFIGS["smoke"]))
    assert compiled == [net]                                            # off by default


# --- 7. The refusal's FLOPs are the counted ones -----------------------------------------------------------------

@pytest.mark.parametrize("module", [sfd, pd, cd, sfddm, cfd, sferd], ids=lambda m: m.__name__)
def test_paper_cost_constants_are_the_counted_flops(module):
    """PAPER_COST of every method (what the refusal of a paper run without CUDA estimates from): its FLOPs per unit
    recounted on the meta device (python common.py flops) within 0.1 %, its units the bench step's budget."""
    row = common.count_step_flops(module.bench_step, module.__name__, "paper")
    cost = module.PAPER_COST
    assert (cost["unit"], cost["units"]) == (row["unit"], row["total"])
    assert abs(row["flops_per_unit"] / cost["flops_per_unit"] - 1) < 1e-3, row["flops_per_unit"]
