"""Tests of the full-scale path (issue 21): the preset default by dataset, the refusal of a paper run
without CUDA, --export in both formats (and that fid.py scores the export as the run scored itself),
fid.py's .npz readers (statistics, EDM's reference file, arr_0 samples), and python common.py bench."""
import json
import math
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cd
import common
import fid
import pd
import sfd
from conftest import run_script


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the preset default ----------------------------------------------------------------------

def test_preset_defaults_to_paper_for_cifar10_and_lab_otherwise():
    assert sfd.parse_args(["--dataset", "cifar10"]).preset == "paper"        # the headline command is the paper's
    assert sfd.parse_args([]).preset == "lab" and sfd.parse_args(["--dataset", "folder:/x"]).preset == "lab"
    assert sfd.parse_args(["--dataset", "cifar10", "--preset", "lab"]).preset == "lab"      # an explicit preset wins
    assert cd.parse_args(["--dataset", "cifar10"]).batch == cd.PRESETS["paper"]["batch"]   # resolved before use
    assert pd.parse_args(["--dataset", "fashion"]).iters == pd.PRESETS["lab"]["iters"]
    assert "paper for --dataset cifar10" in " ".join(common.common_parser("x").format_help().split())   # --help says so


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_paper_run_without_cuda_stops_before_work_with_an_estimate(tmp_path, monkeypatch):
    """The refusal comes at once (<= 2 s after the imports: no step is timed, no subprocess), estimated from the
    method's counted FLOPs, and names the lab command; --device cpu runs the paper preset anyway."""
    monkeypatch.setattr(common.sys, "argv", ["cd.py", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")])
    t0 = time.perf_counter()
    with pytest.raises(common.UserError) as e:
        cd.parse_args()
    assert time.perf_counter() - t0 < 2.0
    assert f"python cd.py --dataset cifar10 --data-dir {tmp_path / 'none'} --preset lab" in str(e.value)
    r = run_script("cd.py", "--dataset", "cifar10", "--data-dir", tmp_path / "none", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --preset paper without CUDA: at least ") and " on a CPU " in lines[0]
    assert "`python cd.py --dataset cifar10 --data-dir" in lines[0] and "--preset lab` instead" in lines[0]
    assert "--device cpu" in lines[0] and not (tmp_path / "runs").exists()        # nothing was started
    # --device cpu: no refusal, the run goes on (and stops at the missing data, one line).
    r = run_script("cd.py", "--dataset", "cifar10", "--data-dir", tmp_path / "none", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2 and "holds neither" in r.stderr and "without CUDA" not in r.stderr


def test_refusal_estimate_is_the_counted_flops_times_the_budget(monkeypatch):
    monkeypatch.setattr(common.sys, "argv", ["sfd.py", "--dataset", "cifar10", "--preset", "paper", "--nfe", "4"])
    cost = dict(unit="trajectories", units=86_400, flops_per_unit=2 * common.CPU_FLOPS)     # 2 s each: 2 days
    with pytest.raises(common.UserError, match=r"at least 2 days on a CPU \(2e\+11 FLOP per trajectory, counted, x "
                       r"86,400 trajectories .*`python sfd.py --dataset cifar10 --nfe 4 --preset lab`"):
        common.refuse_paper_on_cpu("sfd", cost)
    assert common.duration(3 * 365.25 * 86400) == "3.0 years" and common.duration(5400) == "1.50 h"


# --- export ----------------------------------------------------------------------------------

def export_args(tmp_path, **kw):
    return common.Eval(**{**dict(export=5, export_format="png", export_dir=None, resume=False, batch_size=2,
                                 dataset="fashion"), **kw})


def noise_images(calls):
    """A stand-in sampler: a fixed map of the noise, counting how many images it was asked for."""
    def sample_fn(eps):
        calls.append(len(eps))
        return torch.tanh(eps)
    return sample_fn


def test_export_png_layout_npz_array_and_resume(tmp_path):
    shape, calls = (1, 8, 8), []
    png = fid.export_samples(export_args(tmp_path), tmp_path / "run", noise_images(calls), shape, "cpu")
    assert png == tmp_path / "run" / "samples-5" and sum(calls) == 5
    files = sorted(p.relative_to(png).as_posix() for p in png.rglob("*.png"))
    assert files == [f"000000/00000{k}.png" for k in range(5)]                  # EDM generate.py's layout
    images = np.stack([np.asarray(Image.open(png / f)) for f in files])[..., None]
    expected = common.to_uint8(torch.tanh(common.PerSampleNoise(common.EVAL_SEED, range(5)).randn(*shape)))
    assert np.array_equal(images, expected.permute(0, 2, 3, 1).numpy())        # sample k is evaluation noise k
    # Resume: only the missing image is made again, and it is the same image.
    (png / "000000" / "000003.png").unlink()
    calls.clear()
    fid.export_samples(export_args(tmp_path, resume=True), tmp_path / "run", noise_images(calls), shape, "cpu")
    assert calls == [1] and np.array_equal(np.asarray(Image.open(png / "000000" / "000003.png")), images[3, ..., 0])
    # npz: one uint8 N x H x W x C arr_0 with the same pixels; interrupted after one batch, then resumed.
    def dies_after_one(eps, seen=[]):
        seen.append(1)
        if len(seen) > 1:
            raise KeyboardInterrupt
        return torch.tanh(eps)
    args = export_args(tmp_path, export_format="npz")
    with pytest.raises(KeyboardInterrupt):
        fid.export_samples(args, tmp_path / "run", dies_after_one, shape, "cpu")
    target = tmp_path / "run" / "samples-5.npz"
    assert not target.exists() and json.loads(target.with_name("samples-5.npz.partial.json").read_text())["done"] == 2
    with pytest.raises(common.UserError, match="exists and is not empty: pass --resume"):     # partial: not restarted
        fid.export_samples(args, tmp_path / "run", noise_images([]), shape, "cpu")
    calls.clear()
    fid.export_samples(export_args(tmp_path, export_format="npz", resume=True), tmp_path / "run", noise_images(calls),
                          shape, "cpu")
    assert calls == [2, 1] and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["samples-5", "samples-5.npz"]
    with np.load(target, allow_pickle=False) as z:
        assert z.files == ["arr_0"] and z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_0"], images)


def test_export_refusals(tmp_path):
    for flags, match in ((["--export", "0"], "must be positive"), (["--export", "-3"], "must be positive"),
                         (["--export", "4", "--export-format", "jpg"], "use png or npz")):
        with pytest.raises(common.UserError, match=match):
            sfd.parse_args(flags)
    # An existing non-empty folder without --resume: refused at parse time (--export-dir known), nothing touched.
    (tmp_path / "samples-4").mkdir()
    (tmp_path / "samples-4" / "mine.txt").write_text("keep")
    with pytest.raises(common.UserError, match="samples-4 exists and is not empty"):
        sfd.parse_args(["--export", "4", "--export-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="exists and is not empty"):
        fid.export_samples(export_args(tmp_path, export=4), tmp_path, noise_images([]), (1, 8, 8), "cpu")
    assert [p.name for p in (tmp_path / "samples-4").iterdir()] == ["mine.txt"]
    sfd.parse_args(["--export", "4", "--export-dir", str(tmp_path), "--resume"])          # with --resume: allowed
    # Resuming into another run's folder is refused (its manifest names the run).
    fid.export_samples(export_args(tmp_path, export=2), tmp_path / "a", noise_images([]), (1, 8, 8), "cpu")
    shutil.copytree(tmp_path / "a" / "samples-2", tmp_path / "b" / "samples-2")
    with pytest.raises(common.UserError, match="another run"):
        fid.export_samples(export_args(tmp_path, export=2, resume=True), tmp_path / "b", noise_images([]), (1, 8, 8), "cpu")


@pytest.mark.parametrize("script,folder", [("sfd.py", "."), ("pd.py", "nfe4"), ("sfddm.py", "ddim"), ("cd.py", "nfe4")])
def test_export_into_the_run_folder_is_refused_before_training(script, folder, fashion_dir, smoke_teacher, tmp_path):
    """Without --export-dir the export lands in the run's evaluation folder: an existing one there is
    refused in the first seconds (the folder is known then), not after training."""
    run = tmp_path / "run"
    (run / folder / "samples-4").mkdir(parents=True)
    (run / folder / "samples-4" / "mine.png").write_text("keep")
    r = run_script(script, "--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher, "--out", run,
                   "--export", 4, cwd=tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "samples-4 exists and is not empty" in err[0], r.stderr[-2000:]
    assert "it/s" not in r.stderr and "img/s" not in r.stderr                  # no training started
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == [".lock", "mine.png"]   # and the run's OS lock


@pytest.mark.fid
def test_fid_of_the_export_equals_the_runs_own_fid(fashion_dir, smoke_teacher, tmp_path, monkeypatch):
    run = tmp_path / "sfd-run"
    base = ["--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher, "--out", run, "--fid-samples", 8]
    r = run_script("sfd.py", *base, cwd=tmp_path, timeout=1800)        # 4 FID-8s and the reference: ~1 min quiet
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "metrics.json").read_text())
    own = m["fid"]
    assert all(math.isfinite(m[k]) for k in ("kid", "teacher_kid_dpm3m", "teacher_kid_euler")) and m["kid_std"] > 0
    assert f"KID x 1e3 {1e3 * m['kid']:.1f} vs {1e3 * m['teacher_kid_dpm3m']:.1f}" in r.stdout, r.stdout   # beside FID
    for fmt, target in (("png", run / "samples-8"), ("npz", run / "samples-8.npz")):
        r = run_script("sfd.py", *base, "--resume", "--export", 8, "--export-format", fmt, cwd=tmp_path, timeout=1800)
        assert r.returncode == 0 and f"exported 8 samples to {target}" in r.stdout, r.stderr
        monkeypatch.chdir(tmp_path)                         # the reference statistics the run cached (runs/ here)
        opts = dict(device="cpu", batch_size=fid.BATCH_SIZE, data_dir=fashion_dir)
        mu, sigma, n = fid.source_stats(str(target), **opts)
        mu_ref, sigma_ref, _ = fid.source_stats("dataset:fashion", **opts)
        assert n == 8 and abs(fid.frechet_distance(mu, sigma, mu_ref, sigma_ref) - own) < 1e-6 * max(1, own)
    # The same through fid.py's command line.
    r = run_script("fid.py", run / "samples-8", "dataset:fashion", "--data-dir", fashion_dir, cwd=tmp_path, timeout=1800)
    assert r.returncode == 0 and f"FID-8 = {own:.4f}" in r.stdout, r.stdout + r.stderr


# --- fid.py's .npz readers -------------------------------------------------------------------

def npz_args():
    return dict(device="cpu", batch_size=4)


def test_npz_statistics_reader_and_edm_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(fid.FEATURES), rng.standard_normal((fid.FEATURES, 8))
    sigma = a @ a.T
    np.savez(tmp_path / "ours.npz", mu=mu, sigma=sigma, n=123)
    m, s, n = fid.source_stats(str(tmp_path / "ours.npz"), **npz_args())
    assert np.array_equal(m, mu) and np.array_equal(s, sigma) and n == 123
    # EDM's fid-refs file: mu and sigma only (no n), read from the cache; a missing one is downloaded on request.
    (common.DOWNLOAD_DIR / "fid-refs").mkdir(parents=True)
    np.savez(common.DOWNLOAD_DIR / "fid-refs" / "cifar10-32x32.npz", mu=mu.astype(np.float32), sigma=sigma)
    m, s, n = fid.source_stats("edm:cifar10-32x32", **npz_args())
    assert np.array_equal(m, mu.astype(np.float32)) and n is None
    with pytest.raises(common.UserError, match="tried to download https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"
                                               "afhqv2-64x64.npz"):
        fid.source_stats("edm:afhqv2-64x64", **npz_args())
    with pytest.raises(common.UserError, match="edm:NAME"):
        fid.source_stats("edm:../x", **npz_args())
    bad = {"shape.npz": dict(mu=mu[:10], sigma=sigma[:10, :10]), "dtype.npz": dict(mu=mu.astype(int), sigma=sigma),
           "keys.npz": dict(features=mu), "obj.npz": dict(mu=np.array([{"a": 1}], dtype=object), sigma=sigma),
           "float-samples.npz": dict(arr_0=rng.random((4, 8, 8, 3))),
           "nhwc.npz": dict(arr_0=rng.integers(0, 255, (4, 3, 8, 8), dtype=np.uint8))}
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, match in (("shape.npz", r"expected float \(2048,\)"), ("dtype.npz", "int64"), ("keys.npz", "holds features"),
                        ("obj.npz", "not a readable .npz of plain arrays"), ("junk.npz", "not a readable .npz"),
                        ("float-samples.npz", "arr_0 is float64"), ("nhwc.npz", r"arr_0 is uint8 \(4, 3, 8, 8\)")):
        with pytest.raises(common.UserError, match=match):
            fid.source_stats(str(tmp_path / name), **npz_args())


def test_npz_samples_reader_feeds_the_images_as_a_folder_would(tmp_path, monkeypatch):
    seen = []

    def fake_stats(batches, device, fast=False, progress=True, inception=None, total=None):
        seen.extend(batches)
        return "mu", "sigma", total
    monkeypatch.setattr(fid, "feature_stats", fake_stats)
    arr = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr)
    assert fid.source_stats(str(tmp_path / "s.npz"), **npz_args()) == ("mu", "sigma", 6)
    assert [b.shape for b in seen] == [(4, 3, 8, 8), (2, 3, 8, 8)]          # NHWC -> NCHW batches, uint8
    assert torch.equal(torch.cat(seen), torch.from_numpy(arr).permute(0, 3, 1, 2)) and seen[0].dtype == torch.uint8


@pytest.mark.fid
def test_cifar10_reference_is_the_whole_training_set(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    monkeypatch.setattr(common, "load_dataset", lambda name, data_dir=None, split="train": (images, None))
    monkeypatch.setattr(fid, "feature_stats", lambda batches, *a, total=None, keep=0, **k: (
        np.zeros(fid.FEATURES), np.eye(fid.FEATURES), sum(len(b) for b in batches), np.zeros((keep, 4), np.float32)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid, "REF_N", 30)                                # the subset other datasets get (5,000)
    assert fid.reference_stats("cifar10")[2] == 70                      # all of them (the papers' 50,000)
    assert fid.reference_stats("fashion")[2] == 30                      # a subset of REF_N
    assert fid.reference_stats("cifar10", n=20)[2] == 20
    assert (tmp_path / "runs" / "cifar10" / "fid" / "ref-train-n70.npz").is_file()        # cached


# --- the bench -------------------------------------------------------------------------------

def test_bench_reports_every_method_at_smoke(tmp_path):
    rows = common.bench(methods=list(common.BENCH_METHODS), preset="smoke", channels=1, batch_size=None, steps=1, warmup=1,
                        device="cpu", channels_last=False, compile=False, out=str(tmp_path / "b"))
    assert [r["method"] for r in rows] == ["sfd", "pd", "cd", "sfddm", "cfd", "sferd"]
    for r in rows:
        assert r["throughput"] > 0 and r["total"] > 0 and r["flops_per_step"] > 0 and r["projected_hours"] > 0
    table = (tmp_path / "b.md").read_text()
    assert all(f"| {m} | smoke |" in table for m in common.BENCH_METHODS)
    head = table.splitlines()[0]                      # what was measured: device, MFU's peak, torch, commit, path
    assert head.startswith("bench on CPU (cpu), MFU against no known peak, torch ") and ", commit " in head
    assert "training's code path: fp32, channels_last False, compile False" in head
    assert common.gpu_peak("NVIDIA H100 80GB HBM3") == (989e12, "H100") and common.gpu_peak("NVIDIA A100-SXM4-40GB")[0] == 312e12
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["unit"] == "trajectories"


# --- A class's shared work, prepared once (issue 33) ------------------------------------------------------------

@pytest.mark.fid
def test_a_prepared_folder_copied_into_a_fresh_checkout_is_used_as_is(fashion_dir, tmp_path):
    """python common.py prepare in the instructor's checkout, runs/ copied into a student's: the student's run trains
    no teacher, computes no reference statistics and no teacher baseline, and changes no file it was given."""
    teacher_side, student_side = tmp_path / "instructor", tmp_path / "student"
    teacher_side.mkdir()
    student_side.mkdir()
    r = run_script("common.py", "prepare", "--preset", "smoke", "--data-dir", fashion_dir, "--fid-samples", 8,
                   "--nfe", 4, "--device", "cpu", cwd=teacher_side, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prepared runs/fashion in " in r.stdout and "training it now" in r.stderr     # it trained the teacher
    given = teacher_side / "runs" / "fashion"
    assert (given / "teacher-smoke" / "teacher.pt").is_file() and list((given / "fid").glob("ref-train-n*.npz"))
    shutil.copytree(teacher_side / "runs", student_side / "runs")
    before = {p: p.stat().st_mtime_ns for p in (student_side / "runs").rglob("*") if p.is_file()}
    r = run_script("sfd.py", "--preset", "smoke", "--data-dir", fashion_dir, "--fid-samples", 8, "--nfe", 4,
                   cwd=student_side, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert "training it now" not in said and "fid: reference stats" not in said and "rebuilding" not in said, said
    assert not re.search(r"teacher \S+ \d+ NFE:", said), said                        # no teacher baseline sampled
    assert [p for p, t in before.items() if p.stat().st_mtime_ns != t and p.name != ".lock"] == []
    made = {p.relative_to(student_side / "runs" / "fashion").parts[0] for p in (student_side / "runs").rglob("*")
            if p.is_file() and p not in before}
    assert made == {"sfd-nfe4"}, made                                                  # only the student's run folder
