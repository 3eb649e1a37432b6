"""Published teachers (common.py section 13): EDM's SongUNet and DDPM's U-Net against their publishers'
outputs, the real CIFAR-10 checkpoints' layouts, the snapshot reader that never runs code, and the
methods end to end on the tiny teachers. Test material: tests/data/ (made by EDM's and diffusers' own
code with random weights; tests/data/README.md says what each file is)."""
import json
import os
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, run_script

torch.set_num_threads(2)
DATA = ROOT / "tests" / "data"
EDM_PKL, DDPM_DIR = DATA / "edm-tiny-uncond.pkl", DATA / "ddpm-tiny"

# The real CIFAR-10 networks: EDM's edm-cifar10-32x32-uncond-vp.pkl (its SongUNet _init_kwargs) and
# google/ddpm-cifar10-32 (the tiny folder's layout at full width: 128, 256, 256, 256 channels, 32 groups).
EDM_CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=128,
                   channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.13,
                   embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                   resample_filter=[1, 1])
DDPM_CIFAR10 = dict(json.loads((DDPM_DIR / "config.json").read_text()), block_out_channels=[128, 256, 256, 256],
                    norm_num_groups=32)


def rel_err(a, b):
    """max |a - b| / max |b| (the issue's measure)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --- The goldens: D of both tiny teachers equals the publishers' outputs ---------------------------

def test_edm_snapshot_matches_edm():
    D = common.load_denoiser(EDM_PKL)
    g = torch.load(DATA / "edm-tiny-golden.pt", weights_only=True)["uncond"]
    assert common.count_params(D.net) == g["n_params"]
    assert common.image_shape(D.net) == (3, 16, 16) and D.source == str(EDM_PKL)
    assert not D.training and not any(p.requires_grad for p in D.parameters())
    with torch.no_grad():
        assert rel_err(D(g["x"], g["sigma"]), g["D"]) < 1e-5        # sigma from 0.002 to 80


def ddpm_reference(g):
    """EDM view of the golden (README of the test material): x_edm = x/sqrt(abar_t), D = x_edm - sigma_t*eps."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[g["t"]]
    sigma = common.sigma_from_alpha_bar(abar)
    x_edm = g["x"].double() / abar.sqrt().reshape(-1, 1, 1, 1)
    return x_edm.float(), sigma.float(), x_edm - sigma.reshape(-1, 1, 1, 1) * g["eps"].double()


@pytest.mark.parametrize("weights", ["safetensors", "bin", "bin-legacy-names"])
def test_ddpm_folder_matches_diffusers(weights, tmp_path):
    folder = tmp_path / "ddpm"
    shutil.copytree(DDPM_DIR, folder)
    if weights != "safetensors":
        (folder / "diffusion_pytorch_model.safetensors").unlink()
    if weights == "bin-legacy-names":        # older diffusers files: query/key/value/proj_attn
        legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        state = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
        renamed = {}
        for k, v in state.items():
            for new, old in legacy.items():
                k = k.replace(f".{new}.", f".{old}.")
            renamed[k] = v
        assert any(".query." in k for k in renamed)
        torch.save(renamed, folder / "diffusion_pytorch_model.bin")
    D = common.load_denoiser(folder)
    g = torch.load(DATA / "ddpm-tiny-golden.pt", weights_only=True)
    assert common.count_params(D.net) == g["n_params"] and common.image_shape(D.net) == (3, 32, 32)
    x_edm, sigma, D_ref = ddpm_reference(g)
    with torch.no_grad():
        assert rel_err(D.net(g["x"], g["t"].float()), g["eps"]) < 1e-5       # eps(x_t, t), t from 0 to 999
        assert torch.allclose(D.net.t_from_sigma(sigma), g["t"].float(), atol=1e-3)
        assert rel_err(D(x_edm, sigma), D_ref) < 1e-5


def test_ddpm_t_interpolates_between_steps():
    net = common.load_denoiser(DDPM_DIR).net
    ls = net.log_sigmas
    mid = ((ls[10] + ls[11]) / 2).exp()                        # halfway in ln(sigma) between t = 10 and 11
    assert net.t_from_sigma(mid.reshape(1)).item() == pytest.approx(10.5, abs=1e-4)
    ends = net.t_from_sigma(torch.tensor([1e-4, 1e4]))          # outside the table: clamped
    assert ends.tolist() == [0.0, 999.0]


# --- The real checkpoints' layouts (random weights on the meta device) ---------------------------

def read_keys(path):
    out = {}
    for line in path.read_text().splitlines():
        name, shape = line.split(" ", 1)
        out[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return out


def test_real_cifar10_layouts():
    with torch.device("meta"):
        edm, ddpm = common.SongUNet(**EDM_CIFAR10), common.DDPMUNet(DDPM_CIFAR10, {})
    for net, keys, prefix, n in ((edm, "edm-cifar10-uncond-ddpmpp-keys.txt", "model.", 55_733_891),
                                 (ddpm, "ddpm-cifar10-32-keys.txt", "", 35_746_307)):
        assert {prefix + k: tuple(v.shape) for k, v in net.state_dict().items()} == read_keys(DATA / keys)
        assert common.count_params(net) == n


def test_ncsnpp_settings_build_edm_ve_layout():
    """EDM's VE checkpoints (NCSN++ settings): Fourier embedding (its frequencies are a buffer of the
    snapshot), a residual encoder path with fused resampling, filter [1, 3, 3, 1]."""
    net = common.SongUNet(**{**EDM_CIFAR10, "model_channels": 16, "img_resolution": 16, "num_blocks": 1, "attn_resolutions": [8],
                             "embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
                             "resample_filter": [1, 3, 3, 1]}).eval()
    state = net.state_dict()
    assert state["map_noise.freqs"].shape == (16,)
    assert [k for k in state if "aux_residual" in k and k.endswith("weight")] == ["enc.8x8_aux_residual.weight",
                                                                                  "enc.4x4_aux_residual.weight"]
    assert state["enc.8x8_aux_residual.resample_filter"].shape == (1, 1, 4, 4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, torch.zeros(2))
        net.enc["8x8_aux_residual"].weight.mul_(2)            # the residual path reaches the output
        assert out.shape == x.shape and not torch.allclose(net(x, torch.zeros(2)), out)
    with pytest.raises(common.UserError, match="encoder skip"):
        common.SongUNet(**{**EDM_CIFAR10, "encoder_type": "skip"})


# --- The snapshot reader never runs code; bad files give one line --------------------------------

class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("where", ["top", "inside-state"])
def test_hostile_pickle_refused_and_not_run(where, tmp_path):
    marker = tmp_path / "pwned"
    payload = _Touch(marker) if where == "top" else {"ema": {"state": [_Touch(marker)]}, "loss_fn": None}
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(pickle.dumps(payload))
    with open(path, "rb") as f:                    # the bare unpickler would run it: the file is really hostile
        assert b"system" in f.read()
    with pytest.raises(common.UserError, match="refusing .*system"):
        common.load_denoiser(path)
    assert not marker.exists()


def test_bad_files_give_one_line(tmp_path):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(EDM_PKL.read_bytes()[: EDM_PKL.stat().st_size // 2])
    random_file = tmp_path / "random.pkl"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    random_pt = tmp_path / "random.pt"
    random_pt.write_bytes(np.random.default_rng(1).bytes(4096))
    no_config = tmp_path / "folder"
    no_config.mkdir()
    shutil.copy(DDPM_DIR / "diffusion_pytorch_model.safetensors", no_config)
    short_weights = tmp_path / "short"
    shutil.copytree(DDPM_DIR, short_weights)
    (short_weights / "diffusion_pytorch_model.bin").unlink()
    st = short_weights / "diffusion_pytorch_model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    cases = {truncated: "truncated", random_file: "truncated or not an EDM snapshot", random_pt: "corrupt",
             no_config: "no config.json", short_weights: "truncated or unreadable", tmp_path / "nothing": "no such"}
    for path, words in cases.items():
        with pytest.raises(common.UserError, match=words) as e:
            common.load_denoiser(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_bad_teacher_is_one_stderr_line(tmp_path):
    bad = tmp_path / "random.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    r = run_script("sfd.py", "--preset", "smoke", "--dataset", "cifar10", "--teacher", bad, "--nfe", "2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not an EDM snapshot" in r.stderr


# --- Writing snapshots in EDM's layout (for the variants below): stand-ins -> EDM's globals ----------

def write_snapshot(data, path, monkeypatch, protocol=4, numpy_core="numpy._core"):
    """Pickle a tree of common._Persistent stand-ins back into EDM's layout: persistent objects through
    torch_utils.persistence._reconstruct_persistent_obj, ModuleDicts by value, tensors as torch pickles them."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only written, never called here")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod = types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    def module_dicts(obj):          # ModuleDict stand-ins -> real (empty-bodied) ModuleDicts with that state
        for k, child in obj.state.get("_modules", {}).items():
            module_dicts(child)
            if child.class_name == "ModuleDict":
                obj.state["_modules"][k] = m = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
                m.__dict__.update(child.state)
    for value in (data.values() if isinstance(data, dict) else [data]):
        if isinstance(value, common._Persistent):
            module_dicts(value)

    class Writer(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, common._Persistent):
                return (_reconstruct_persistent_obj, (dict(type="class", version=6, class_name=obj.class_name,
                                                           module_src="raise RuntimeError('never run')\n", state=obj.state),))
            return NotImplemented

    with open(path, "wb") as f:
        Writer(f, protocol=protocol).dump(data)
    if numpy_core != "numpy._core":          # numpy 1.x spelled the module numpy.core (GLOBAL opcode, protocol <= 3)
        raw = path.read_bytes()
        assert b"cnumpy._core.multiarray\nscalar\n" in raw
        path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", f"c{numpy_core}.multiarray\n".encode()))
    return path


def read_tree(path):
    with open(path, "rb") as f:
        return common.AllowlistUnpickler(f, common.EDM_SNAPSHOT, "an EDM snapshot").load()


def test_torch1_style_snapshot_reads_the_same(tmp_path, monkeypatch):
    """Protocol 3 (GLOBAL opcodes, builtins.set), numpy.core names, legacy storages: what a torch 1.x /
    numpy 1.x snapshot holds; it must read to the same network."""
    path = write_snapshot(read_tree(EDM_PKL), tmp_path / "old.pkl", monkeypatch, protocol=3, numpy_core="numpy.core")
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x03" and b"cnumpy.core.multiarray\nscalar" in raw and b"cbuiltins\nset" in raw
    g = torch.load(DATA / "edm-tiny-golden.pt", weights_only=True)["uncond"]
    with torch.no_grad():
        assert rel_err(common.load_denoiser(path)(g["x"], g["sigma"]), g["D"]) < 1e-5


def test_conditional_and_other_preconds_refused(tmp_path, monkeypatch):
    tree = read_tree(EDM_PKL)
    tree["ema"].state["_init_kwargs"]["label_dim"] = 10
    with pytest.raises(common.UserError, match="class-conditional .*uncond"):
        common.load_denoiser(write_snapshot(tree, tmp_path / "cond.pkl", monkeypatch))
    tree = read_tree(EDM_PKL)
    tree["ema"].class_name = "VPPrecond"
    with pytest.raises(common.UserError, match="VPPrecond"):
        common.load_denoiser(write_snapshot(tree, tmp_path / "vp.pkl", monkeypatch))


# --- Every network behaves the same through build_net / student_from / checkpoints ----------------

@pytest.mark.parametrize("spec", [EDM_PKL, DDPM_DIR])
def test_student_copy_and_checkpoint_round_trip(spec, tmp_path):
    D = common.load_denoiser(spec)
    student = common.Denoiser(common.student_from(D.net).eval())          # eval: dropout off
    shape = common.image_shape(D.net)
    x, sigma = torch.randn(2, *shape), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        assert torch.equal(student(x, sigma), D(x, sigma))
    common.save_checkpoint(tmp_path / "s.pt", "x-student", net_config=D.net.config, net=D.net.state_dict())
    ck = common.load_checkpoint(tmp_path / "s.pt", "x-student")          # weights_only: plain config values
    net = common.build_net(ck["net_config"])
    net.load_state_dict(ck["net"])
    with torch.no_grad():
        assert torch.equal(common.Denoiser(net.eval())(x, sigma), D(x, sigma))
    with pytest.raises(common.UserError, match="extra condition"):
        common.student_from(D.net, cond_dim=8)


def test_old_fewstep_config_without_arch_still_builds():
    config = common.UNet(in_ch=1, **common.NET_CONFIGS["smoke"]).config
    assert config.pop("arch") == "fewstep"
    assert isinstance(common.build_net(config), common.UNet)


# --- Names: edm / ddpm from the cache, cifar10 paper default, offline error ---------------------------

def test_published_names_use_the_cache_and_paper_default(tmp_path, monkeypatch):
    ev = common.Eval(dataset="cifar10", preset="paper", device="cpu")
    with pytest.raises(common.UserError, match="teacher 'edm' is not cached.*edm-cifar10-32x32-uncond-vp.pkl") as e:
        common.load_teacher(ev)                        # the paper default is EDM's checkpoint; tests never download
    assert "\n" not in str(e.value)
    common.DOWNLOAD_DIR.mkdir(parents=True)
    shutil.copy(EDM_PKL, common.DOWNLOAD_DIR / "edm-cifar10-32x32-uncond-vp.pkl")
    D, path = common.load_teacher(ev)
    assert path == common.DOWNLOAD_DIR / "edm-cifar10-32x32-uncond-vp.pkl" and common.net_arch(D.net) == "edm-songunet"
    shutil.copytree(DDPM_DIR, common.DOWNLOAD_DIR / "ddpm-cifar10-32")
    assert common.net_arch(common.load_denoiser("ddpm").net) == "ddpm-diffusers"
    (common.DOWNLOAD_DIR / "ddpm-cifar10-32" / "config.json").write_text("{")          # a broken download
    with pytest.raises(common.UserError, match="unreadable config.json.*delete .*ddpm-cifar10-32 to fetch it again"):
        common.load_denoiser("ddpm")


# --- The methods on the tiny teachers, end to end ------------------------------------------------------

def image_folder(path, n=16, res=32):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_sfd_on_the_tiny_edm_snapshot(tmp_path):
    r = run_script("sfd.py", "--preset", "smoke", "--dataset", "cifar10", "--teacher", EDM_PKL, "--nfe", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "cifar10" / "sfd-nfe2" / "metrics.json").read_text())
    assert metrics["teacher"] == str(EDM_PKL) and metrics["fid"] is None and metrics["teacher_rms"] > 0
    assert Image.open(tmp_path / "runs" / "cifar10" / "sfd-nfe2" / "samples.png").size == (8 * 18 + 2, 8 * 18 + 2)
    assert not (DATA / "eval").exists()                  # the teacher's own samples are cached under runs/


def test_pd_on_the_tiny_ddpm_folder(tmp_path):
    data = image_folder(tmp_path / "images")
    r = run_script("pd.py", "--preset", "smoke", "--dataset", f"folder:{data}", "--teacher", DDPM_DIR, "--nfe", "4",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "folder-images" / "pd-smoke" / "nfe4" / "metrics.json").read_text())
    assert metrics["nfe"] == 4 and metrics["teacher_rms"] > 0


def test_methods_refuse_what_the_published_nets_lack(tmp_path):
    data = image_folder(tmp_path / "images", n=4, res=16)
    for script, teacher, words in (("sferd.py", EDM_PKL, "SFERD reads the teacher U-Net's attention maps"),
                                   ("cd.py", DDPM_DIR, "EDM preconditioning"),
                                   ("sfd.py", EDM_PKL, "SFD-v feeds the NFE")):
        nfe = "2,3" if script == "sfd.py" else "2"
        r = run_script(script, "--preset", "smoke", "--dataset", f"folder:{data}", "--teacher", teacher, "--nfe", nfe,
                       cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr and r.stderr.strip().count("\n") == 0, (script, r.stderr[-1000:])
    r = run_script("pd.py", "--preset", "smoke", "--dataset", f"folder:{data}", "--teacher", EDM_PKL, cwd=tmp_path)
    assert r.returncode == 2 and "the teacher makes 3x16x16 images but" in r.stderr     # folders are read at 32x32
