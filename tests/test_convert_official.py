"""tools/convert_official.py and dimscale/official.py against data computed by the official DiM code (fp32, CPU).

Oracle: ../shared/fixtures/official_dim (its README): tiny official nnets, Upsample Guidance, a tiny U-ViT VAE and
every released config's key list. Gate: max|a - b| / max|ref| <= 1e-5.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FIX = REPO.parent / "shared" / "fixtures" / "official_dim"
sys.path.insert(0, str(REPO))

from dimscale.official import RELEASES, OfficialCheckpointError, convert_state_dict  # noqa: E402
from tools.convert_official import main as convert_main  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # CI lays shared/ beside the clone: there a missing oracle is a failure, not a skip
              pytest.mark.skipif(not FIX.is_dir() and not os.environ.get("CI"),
                                 reason="official DiM fixtures (../shared/fixtures) not present")]
TOL = 1e-5


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def fixture(name):
    """(official state dict, other tensors) of a fixture file."""
    d = load_file(FIX / f"{name}.safetensors")
    official = {k[3:]: v for k, v in d.items() if k.startswith("sd.")}
    return official, {k: v for k, v in d.items() if not k.startswith("sd.")}


def official_pth(tmp_path, name, mutate=None):
    """The fixture's state dict saved as an official nnet_ema.pth (torch.save of a plain dict)."""
    sd, _ = fixture(name)
    if mutate:
        mutate(sd)
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    return path


def convert(tmp_path, capsys, *argv):
    """(exit code, stderr) of the tool run in-process."""
    rc = convert_main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------------------------
# Numerics: converted weights reproduce the official outputs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, release", [("tiny_lateral", "imagenet256_H"), ("tiny_rho_pad", "imagenet512_H_ft")])
def test_tiny_official_nnets_match_after_conversion(tmp_path, capsys, name, release):
    from dimscale.snapshot import load_snapshot
    rc, err = convert(tmp_path, capsys, official_pth(tmp_path, name), "--release", release, "--out", tmp_path / "snap")
    assert rc == 0, err
    model, meta = load_snapshot(str(tmp_path / "snap"))
    _, t = fixture(name)
    assert meta["official"]["release"] == release and meta["model"]["pad_mode"] == RELEASES[release]["pad_mode"]
    assert (meta["model"]["width"], meta["model"]["depth"]) == (32, 9)   # sizes from the shapes, not the zoo name
    with torch.no_grad():
        err = rel_err(model(t["x"], t["t"], t["y"]), t["out"])
        assert err <= TOL, err
        if "x_24" in t:   # another grid: the official way resizes the pos-emb at load, ours in the forward pass
            err = rel_err(model(t["x_24"], t["t"], t["y"]), t["out_24"])
            assert err <= TOL, err


def ug_model(variant):
    from dimscale.models import build_model
    sd, _ = fixture("tiny_rho_pad")
    state, cfg, _ = convert_state_dict(sd, "imagenet512_H_ft" if variant == "native" else "imagenet512_H_upsample")
    if variant == "deploy_no_skip_tune":
        cfg.skip_tune = False
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval(), state


@pytest.mark.parametrize("variant", ["native", "deploy", "deploy_no_skip_tune"])
def test_upsample_guidance_matches_official_conventions(variant):
    """UG (m=2, s=3) as the official make_ufg_nnet computes it: τ time values n·1000/999, float32 floor of t·1000,
    and for the deploy variants the pos-emb resized to the 2x grid at load and back down in the base pass."""
    from dimscale.diffusion import Schedule, cfg_denoiser, upsample_guidance
    _, u = fixture("ug_tiny")
    model, state = ug_model(variant)
    if variant != "native":
        assert state["pos_embed"].shape == u["deploy.sd.additional_embed"].shape
        assert rel_err(state["pos_embed"], u["deploy.sd.additional_embed"]) <= 1e-6
    errs = {}
    for official in (True, False):
        eps_fn = upsample_guidance(cfg_denoiser(model, u["y"], 3.0), Schedule(), 2, 1.0, 0.3, official=official)
        with torch.no_grad():
            for t in u["t_continuous"].tolist():
                out = eps_fn(u["x"], torch.full((2,), t))
                errs[official, round(t, 2)] = rel_err(out, u[f"{variant}.out.t{round(t, 2):g}"])
    assert max(v for (o, _), v in errs.items() if o) <= TOL, errs
    assert errs[False, 0.95] > 1e-3, errs   # dimscale's own τ = n/1000 is a different (documented) choice


def test_skip_tune_is_what_tells_deploy_apart():
    """Skip-tune is a near no-op (factors >= 0.99982) but measurable: without it the deploy output is missed."""
    from dimscale.diffusion import Schedule, cfg_denoiser, upsample_guidance
    _, u = fixture("ug_tiny")
    model, _ = ug_model("deploy_no_skip_tune")
    eps_fn = upsample_guidance(cfg_denoiser(model, u["y"], 3.0), Schedule(), 2, 1.0, 0.3, official=True)
    with torch.no_grad():
        out = eps_fn(u["x"], torch.full((2,), 0.95))
    assert rel_err(out, u["deploy.out.t0.95"]) > TOL


def test_vae_conversion_matches_official_encode_decode(tmp_path, capsys):
    from dimscale.diffusion.vae import decode, encode_moments, load_vae
    sd, t = fixture("vae_tiny")
    torch.save(sd, tmp_path / "autoencoder_kl_ema.pth")
    rc, err = convert(tmp_path, capsys, tmp_path / "autoencoder_kl_ema.pth", "--vae", "--out", tmp_path / "vae")
    assert rc == 0, err
    vae = load_vae(str(tmp_path / "vae"))
    with torch.no_grad():
        moments = encode_moments(vae, t["x"])
        assert rel_err(moments, t["moments"]) <= TOL
        mean, logvar = moments.chunk(2, dim=1)   # the official encode() = scale (mean + std eps), eps stored
        z = 0.18215 * (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * t["encode_eps"])
        assert rel_err(z, t["encode_z"]) <= TOL
        assert rel_err(decode(vae, t["z"], 0.18215), t["decode"]) <= TOL


# ------------------------------------------------------------------------------------------------
# Every released config: full coverage onto the zoo model, exact shapes
# ------------------------------------------------------------------------------------------------

KEYS = json.loads((FIX / "keys.json").read_text()) if FIX.is_dir() else {"configs": {}}


@pytest.mark.parametrize("release", list(RELEASES))
def test_released_key_lists_convert_onto_the_zoo_model(release):
    from dimscale.models import build_model
    entry = KEYS["configs"][RELEASES[release]["config"]]
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in entry["state_dict"].items()}
    state, cfg, meta = convert_state_dict(sd, release)
    assert cfg.name in ("DiM-H/2", "DiM-L/2", "DiM-S/2") and (cfg.width, cfg.depth, cfg.patch) == (0, 0, 0)
    with torch.device("meta"):
        model = build_model(cfg)
    want = model.state_dict()
    assert len(state) == len(sd) == len(want) and set(state) == set(want)           # one to one, all covered
    assert all(tuple(state[k].shape) == tuple(want[k].shape) for k in want)
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    values = {k: v["value"] for k, v in entry["values"].items()}
    assert (cfg.pad_mode, cfg.skip_tune, cfg.in_channels, cfg.num_classes) == (
        values["pad_mode"], values["is_skip_tune"], values["in_channels"], values["num_classes"])
    assert cfg.input_size == values["latent_size"]
    assert meta["sampling"]["steps"] == values["sample_steps"]
    assert meta["sampling"]["cfg_scale"] == (values["cfg_scale"] or 0.0)
    if values["is_skip_tune"]:
        got = {str(len(model.blocks) - len(model.skip_scales) + i): s for i, s in enumerate(model.skip_scales)}
        assert got == pytest.approx(values["skip_tune_multipliers"], abs=1e-7)
        assert meta["sampling"]["upsample"]["factor"] == values["ug_m"]
    if values["is_skip_tune"]:   # what is released for UG is the 512 fine-tuned file: resized to this grid here
        ft = {k: torch.empty(shape, device="meta") for k, (shape, _) in
              KEYS["configs"]["imagenet512_H_DiM_ft"]["state_dict"].items()}
        deployed = convert_state_dict(ft, release)[0]
        assert {k: tuple(v.shape) for k, v in deployed.items()} == {k: tuple(v.shape) for k, v in state.items()}
    # with no --release the shapes pick it, unless the file serves several (the 512 ft weights feed UG too)
    if release == "imagenet512_H_ft":
        with pytest.raises(OfficialCheckpointError, match="serves several releases"):
            convert_state_dict(sd)
    else:
        assert convert_state_dict(sd)[2]["official"]["release"] == release


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit 2, nothing written
# ------------------------------------------------------------------------------------------------

class NotAStateDict:
    pass


def bad_truncated(tmp_path):
    path = official_pth(tmp_path, "tiny_lateral")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, [], "not a complete torch.save file"


def bad_extra_key(tmp_path):
    return official_pth(tmp_path, "tiny_lateral", lambda sd: sd.update(ema_decay_hint=torch.zeros(1))), [], \
        "unmapped key 'ema_decay_hint'"


def bad_missing_key(tmp_path):
    return official_pth(tmp_path, "tiny_lateral", lambda sd: sd.pop("a4m_adapter.last_smoother.bias")), [], \
        "missing key: the file has no tensor for dimscale 'last_smoother.bias'"


def bad_misshaped_key(tmp_path):
    return official_pth(tmp_path, "tiny_lateral", lambda sd: sd.update({
        "transformer_blocks.3.attn1.D": torch.zeros(65)})), [], "mis-shaped key 'transformer_blocks.3.attn1.D'"


def bad_pickled_object(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": NotAStateDict()}, path)
    return path, [], "a pickled object that weights_only loading refuses"


def bad_list(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    return path, [], "holds a list, not a state dict"


def bad_release_channels(tmp_path):
    return official_pth(tmp_path, "tiny_lateral"), ["--release", "cifar10_S"], "takes 4 input channels"


def bad_release_512_as_256(tmp_path):
    """A 512 H checkpoint (1026 pos-emb rows) with --release imagenet256_H; 1-element storages keep it tiny."""
    entry = KEYS["configs"]["imagenet512_H_DiM_ft"]["state_dict"]
    path = tmp_path / "h512.pth"
    torch.save({k: torch.zeros(1).expand(shape) for k, (shape, _) in entry.items()}, path)
    return path, ["--release", "imagenet256_H"], "this is a 512 checkpoint: 1026 pos-emb rows"


def bad_release_name(tmp_path):
    return official_pth(tmp_path, "tiny_lateral"), ["--release", "imagenet1024_X"], "is not a released config"


def bad_no_release(tmp_path):
    return official_pth(tmp_path, "tiny_lateral"), [], "matches no released config; pass --release NAME"


@pytest.mark.parametrize("case", [bad_truncated, bad_extra_key, bad_missing_key, bad_misshaped_key, bad_pickled_object,
                                  bad_list, bad_release_channels, bad_release_512_as_256, bad_release_name,
                                  bad_no_release])
def test_bad_file_gives_one_line_and_writes_nothing(tmp_path, capsys, case):
    path, extra, message = case(tmp_path)
    out = tmp_path / "snap"
    rc, err = convert(tmp_path, capsys, path, *(extra or ["--release", "imagenet256_H"] * (case is not bad_no_release)),
                      "--out", out)
    assert rc == 2
    assert message in err and err.count("\n") == 0, err
    assert not out.exists() and not (tmp_path / "snap.tmp").exists()


def test_bad_vae_file_is_refused(tmp_path, capsys):
    path = official_pth(tmp_path, "tiny_lateral")             # an nnet passed as the VAE
    rc, err = convert(tmp_path, capsys, path, "--vae", "--out", tmp_path / "vae")
    assert rc == 2 and "not an ldm KL autoencoder state dict; it looks like an official DiM nnet" in err
    assert err.count("\n") == 0 and not (tmp_path / "vae").exists()


# ------------------------------------------------------------------------------------------------
# A converted snapshot samples with tools/sample.py and fine-tunes with dimscale/train.py
# ------------------------------------------------------------------------------------------------

def test_converted_snapshot_samples_and_finetunes(tmp_path, capsys):
    import numpy as np
    from test_train_dist import CONFIG, clean_env, fmnist_shards
    from dimscale.models import adapt_state_dict, build_model
    from dimscale.config import ModelConfig
    from tools.sample import main as sample_main
    sd, _ = fixture("vae_tiny")
    torch.save(sd, tmp_path / "vae.pth")
    assert convert(tmp_path, capsys, tmp_path / "vae.pth", "--vae", "--out", tmp_path / "vae")[0] == 0
    snap = tmp_path / "snap"
    assert convert(tmp_path, capsys, official_pth(tmp_path, "tiny_rho_pad"), "--release", "imagenet512_H_ft",
                   "--out", snap)[0] == 0
    npz = tmp_path / "s.npz"
    assert sample_main(["--snapshot", str(snap), "--labels", "1,7", "--steps", "3", "--vae", str(tmp_path / "vae"),
                        "--out", str(tmp_path / "g.png"), "--npz-out", str(npz)]) == 0
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (2, 32, 32, 3) and len({a.tobytes() for a in arr}) == 2   # 16x16 latents, tiny VAE x2

    # fine-tune at 2x the grid with rho_pad (as the 512 release at 1024^2): lr 1e-30 (lr 0 is a config error)
    # moves no weight by a representable step, so the converted weights stay
    meta = json.loads((snap / "snapshot.json").read_text())
    sets = {"data.shards": fmnist_shards(), "out_dir": str(tmp_path), "name": "ft", "data.resolution": 16,
            "data.latent": "online", "data.vae_path": str(tmp_path / "vae"), "data.channels": 3,
            "model.in_channels": 4, "model.input_size": 32, "model.num_classes": 10, "model.width": 32,
            "model.depth": 9, "model.pad_mode": "rho_pad", "init.snapshot": str(snap), "data.num_workers": 0,
            "train.total_images": 16, "train.global_batch": 8, "train.micro_batch": 8, "train.lr": 1e-30,
            "train.warmup_images": 0, "train.snapshot_every_images": 16, "train.ckpt_every_images": 0,
            "train.sample_every_images": 0, "train.precision": "fp32"}
    cmd = [sys.executable, "dimscale/train.py", "--config", str(CONFIG)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(tmp_path / "ft" / "snapshots" / "latest" / "ema.safetensors")
    expected = adapt_state_dict(load_file(snap / "ema.safetensors"),
                                build_model(ModelConfig(**{**meta["model"], "input_size": 32})))
    assert got["pos_embed"].shape == (1, 2 + 16 * 16, 32)                           # resized 8x8 -> 16x16
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


# ------------------------------------------------------------------------------------------------
# The plain (noise-prediction) DPM-Solver of the UG configs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["dpm", "dpm++"])
def test_dpm_solvers_converge_to_the_exact_ode_of_gaussian_data(sampler):
    """Data N(0, s²): ε*(x, t) = σ_t x / (α_t² s² + σ_t²); the ODE keeps x / √(α_t² s² + σ_t²) constant;
    the error shrinks fast with the step count (the piecewise-linear discrete log α limits it at 50 steps)."""
    from dimscale.diffusion import SAMPLERS, Schedule
    sch, s = Schedule(), 0.5
    var = lambda t: sch.alpha(t) ** 2 * s ** 2 + sch.sigma(t) ** 2                        # noqa: E731

    def eps_fn(x, t):
        return (sch.sigma(t.double()) / var(t.double())).view(-1, 1).to(x.dtype) * x

    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0, t1 = torch.tensor([1.0], dtype=torch.float64), torch.tensor([1e-3], dtype=torch.float64)
    exact = x * (var(t1) / var(t0)).sqrt()
    errs = [rel_err(SAMPLERS[sampler](eps_fn, x, sch, steps=n), exact) for n in (50, 200, 500)]
    assert errs[0] < 0.05 and errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3 and errs[2] < 2e-3, errs


# ------------------------------------------------------------------------------------------------
# Options off = today's behaviour; the recorded sampling protocol
# ------------------------------------------------------------------------------------------------

def test_skip_tune_off_or_neutral_is_the_plain_model():
    from dimscale.models import DiM
    torch.manual_seed(0)
    plain = DiM(in_channels=4, input_size=8, num_classes=10, width=32, depth=5).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    for param, same in (((1.0, 1.0), True), ((0.82, 1.0), False)):
        tuned = DiM(in_channels=4, input_size=8, num_classes=10, width=32, depth=5, skip_tune=True,
                    skip_tune_param=param).eval()
        tuned.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert torch.equal(tuned(x, t, y), plain(x, t, y)) == same


def test_snapshot_records_the_sampling_protocol_and_sample_py_follows_it(tmp_path, capsys):
    """An upsampling release samples with the official protocol (plain DPM-Solver, s = 3, UG m = 2 with the official
    time values) from `tools/sample.py --snapshot SNAP` alone; explicit flags still win."""
    import numpy as np
    from dimscale.diffusion import sample
    from dimscale.diffusion.vae import decode, load_vae
    from dimscale.generate import ImageGenerator, SamplingProtocol, to_uint8
    from dimscale.snapshot import load_snapshot, recorded_sampling
    from tools.sample import main as sample_main
    assert recorded_sampling({"diffusion": {"cfg_scale": 0.7}}) == {"cfg_scale": 0.7}   # trainer snapshots: as before
    sd, _ = fixture("vae_tiny")
    torch.save(sd, tmp_path / "vae.pth")
    assert convert(tmp_path, capsys, tmp_path / "vae.pth", "--vae", "--out", tmp_path / "vae")[0] == 0
    snap = tmp_path / "up"
    rc, err = convert(tmp_path, capsys, official_pth(tmp_path, "tiny_rho_pad"), "--release",
                      "imagenet512_H_upsample", "--out", snap)
    assert rc == 0, err
    model, meta = load_snapshot(str(snap))
    assert meta["model"]["skip_tune"] and meta["model"]["input_size"] == 32 and meta["data"]["resolution"] == 128
    assert model.pos_embed.shape == (1, 2 + 16 * 16, 32)                              # resized to the 2x grid
    gen = ImageGenerator.from_snapshot(str(snap), "cpu", str(tmp_path / "vae"))
    assert gen.protocol() == SamplingProtocol(sampler="dpm", steps=50, cfg_scale=3.0, upsample=2, ug_theta=1.0,
                                              ug_eta=0.3, ug_official=True)
    assert gen.protocol(steps=4, upsample=1).upsample == 1                             # flags win
    npz = tmp_path / "s.npz"
    assert sample_main(["--snapshot", str(snap), "--labels", "3,7", "--steps", "4", "--vae", str(tmp_path / "vae"),
                        "--out", str(tmp_path / "g.png"), "--npz-out", str(npz)]) == 0
    x = sample(model, torch.tensor([3, 7]), (4, 16, 16), sampler="dpm", steps=4, cfg_scale=3.0, seeds=[0, 1],
               upsample_factor=2, ug_official=True)
    with torch.no_grad():
        ref = to_uint8(decode(load_vae(str(tmp_path / "vae")), x, 0.18215))
    got = np.load(npz)["arr_0"]
    assert got.shape == (2, 64, 64, 3) and np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    cifar = convert_state_dict({k: torch.empty(s, device="meta") for k, (s, _) in
                                KEYS["configs"]["cifar10_S_DiM"]["state_dict"].items()}, "cifar10_S")[2]
    with pytest.raises(ValueError, match="official sampler 'euler_maruyama_sde'"):
        ImageGenerator(model, {**cifar, "model": meta["model"]}, "cpu").protocol()
