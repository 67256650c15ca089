"""export_timm.py: the export loads strictly into timm's own VisionTransformer and its pooled
tokens equal the l-DAE's forward_features to 1e-5 (fp32) for every registry size, latent norm,
centred PCA, probe t and depth, EMA or raw weights; DiT checkpoints and bad input are refused."""
import os
import subprocess
import sys

import pytest
import torch

import dit_baseline
import export_timm
import ldae
import pretrain
from util import registry  # noqa: E402
from util.cli import UserError
from tokenizer_pca import PatchPCA

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def random_pca(patch_size, img_size, center, seed=0):
    """A random orthonormal basis with spread eigenvalues (and a random mean when centred)."""
    g = torch.Generator().manual_seed(seed)
    D = patch_size * patch_size * 3
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    ev = torch.logspace(1, -3, D, dtype=torch.float64)
    mean = 0.3 * torch.randn(D, generator=g) if center else None
    return PatchPCA(Q.T, ev, mean, patch_size, 3, img_size, center)


def perturb_biases(model, seed):
    """Non-zero biases everywhere (DiT's init zeroes them), so a dropped bias term would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def random_model(name, seed=0, center=False, **overrides):
    """An l-DAE with random ACTIVE weights (open gates, non-zero adaLN shift/scale/gate)."""
    cfg = {**ldae.MODELS[name], **overrides}
    pca = random_pca(cfg.get("patch_size", 16), cfg.get("img_size", 256), center, seed)
    torch.manual_seed(seed)
    model = ldae.build_model(name, pca, **overrides)
    model.init_weights(active=True)
    perturb_biases(model, seed)
    return model.eval()


def write_checkpoint(path, model, ema=None, step=7):
    """The dict pretrain.py's save() writes (its keys), with the given raw and EMA weights."""
    ck = {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
          "optimizer": {}, "scaler": None, "step": step, "epoch": 0,
          "model_config": model.config, "pca": model.pca.to_dict(), "args": {},
          "rng": {"torch": torch.get_rng_state()}, "version": 1}
    torch.save(ck, path)
    return str(path)


def export(ckpt, out, *flags):
    args = export_timm.get_args_parser().parse_args([str(ckpt), "--out", str(out), *flags])
    return export_timm.main(args)


def timm_from_file(path):
    """What a user does: weights_only load, timm's class from the kwargs, strict load."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ck) == {"state_dict", "timm_kwargs", "source"}
    vit = VisionTransformer(**ck["timm_kwargs"])
    vit.load_state_dict(ck["state_dict"], strict=True)
    return vit.eval(), ck


@torch.no_grad()
def timm_features(vit, images):
    return vit.forward_head(vit.forward_features(images), pre_logits=True)


def images(n, size, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name,norm,center", [
    ("vit_tiny", "none", False), ("vit_tiny", "global", False), ("vit_tiny", "whiten", False),
    ("vit_tiny", "none", True), ("vit_tiny", "global", True), ("vit_tiny", "whiten", True),
    ("vit_small", "whiten", True)])
def test_export_equals_forward_features_through_timm(tmp_path, name, norm, center):
    model = random_model(name, center=center, latent_norm=norm)
    ck = write_checkpoint(tmp_path / "checkpoint.pt", model, ema=model)
    res = export(ck, tmp_path / "vit.pt")
    vit, saved = timm_from_file(tmp_path / "vit.pt")
    x = images(4, 32)
    with torch.no_grad():
        want = model.forward_features(x)
    got = timm_features(vit, x)
    assert got.shape == want.shape == (4, model.config["hidden_size"])
    assert (got - want).abs().max().item() < TOL
    # the encoder only: half the blocks, no class token, no norm after the blocks
    assert saved["timm_kwargs"]["depth"] == model.depth // 2 == len(vit.blocks)
    assert vit.cls_token is None and isinstance(vit.norm, torch.nn.Identity)
    assert isinstance(vit.fc_norm, torch.nn.Identity)
    src = saved["source"]
    assert (src["t"], src["depth"], src["latent_norm"], src["pca_center"]) == \
        (10, model.depth // 2, norm, center)
    assert res["self_check_max_abs_diff"] < TOL


def test_train_py_flags_build_the_same_model_through_a_registered_name(tmp_path):
    # timm's train.py: create_model(--model, global_pool=--gp, in_chans=..., **--model-kwargs)
    import argparse
    import shlex
    from timm.utils import ParseKwargs
    model = random_model("vit_tiny", seed=2, center=True)
    ck = write_checkpoint(tmp_path / "checkpoint.pt", model, ema=model)
    res = export(ck, tmp_path / "vit.pt")
    p = argparse.ArgumentParser()
    p.add_argument("--gp")
    p.add_argument("--in-chans", type=int)
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    flags = p.parse_args(shlex.split(res["train_py_flags"]))
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, global_pool=flags.gp,
                            in_chans=flags.in_chans, **flags.model_kwargs)
    vit.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True)["state_dict"])
    x = images(4, 32)
    with torch.no_grad():
        want = model.forward_features(x)
    assert (timm_features(vit.eval(), x) - want).abs().max().item() < TOL


def big_model(name, monkeypatch, seed=0):
    """A registry size at 32 px (2 x 2 patches of 16): the real widths, heads and depths. Built
    with one init, the active one: nn.Linear's own and the build's zero-gate init are skipped
    (init_dit_weights sets every weight; those two were most of vit_l's build time)."""
    real_init = ldae.LDAE.init_weights

    def active_only(self, active=False):
        if active:
            real_init(self, active=True)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
        m.setattr(ldae.LDAE, "init_weights", active_only)
        return random_model(name, seed=seed, center=True, img_size=32, latent_norm="whiten")


@pytest.mark.parametrize("name", ["vit_b", "vit_half_l", "vit_l"])
def test_every_big_registry_size_folds_exactly(name, monkeypatch):
    # in memory (the file path is the small sizes' test): a vit_l checkpoint is 2.7 GB
    model = big_model(name, monkeypatch)
    assert all(p.isfinite().all() for p in model.parameters())
    sd, kw = export_timm.export_model(model, 10, model.depth // 2)
    with torch.device("meta"):                 # timm's shapes, no time spent on its random init
        vit = VisionTransformer(**kw)
    vit.load_state_dict(sd, strict=True, assign=True)
    vit.eval()
    x = images(2, 32)
    with torch.no_grad():
        want = model.forward_features(x)
    # random active weights through 12-24 blocks of width 768-1024 give features up to ~15, where
    # fp32 rounding alone is a few 1e-6 (measured 5e-6 to 9e-6): 1e-5 relative to that scale
    scale = max(1.0, want.abs().max().item())
    assert (timm_features(vit, x) - want).abs().max().item() < TOL * scale
    assert kw["embed_dim"] == ldae.MODELS[name]["hidden_size"]
    assert len(vit.blocks) == ldae.MODELS[name]["depth"] // 2


def test_probe_t_and_depth_are_honoured(tmp_path):
    model = random_model("vit_tiny", seed=3, center=True)
    ck = write_checkpoint(tmp_path / "checkpoint.pt", model, ema=model)
    export(ck, tmp_path / "t437.pt", "--probe-t", "437", "--probe-depth", "3")
    vit, saved = timm_from_file(tmp_path / "t437.pt")
    x = images(4, 32)
    with torch.no_grad():
        want = model.forward_features(x, t=437, depth=3)
        default = model.forward_features(x)
    got = timm_features(vit, x)
    assert (got - want).abs().max().item() < TOL
    # t and depth change the features: the check above could not pass with the defaults folded
    assert (got - default).abs().max().item() > 100 * TOL
    assert len(vit.blocks) == 3 and (saved["source"]["t"], saved["source"]["depth"]) == (437, 3)


def test_ema_and_raw_weights(tmp_path):
    raw = random_model("vit_tiny", seed=4)
    ema = random_model("vit_tiny", seed=5)
    ema.pca.load_state_dict(raw.pca.state_dict())          # one tokenizer, two sets of weights
    ck = write_checkpoint(tmp_path / "checkpoint.pt", raw, ema=ema)
    x = images(4, 32)
    for weights, model in (("ema", ema), ("raw", raw)):
        export(ck, tmp_path / f"{weights}.pt", "--weights", weights)
        vit, saved = timm_from_file(tmp_path / f"{weights}.pt")
        with torch.no_grad():
            want = model.forward_features(x)
        assert (timm_features(vit, x) - want).abs().max().item() < TOL
        assert saved["source"]["weights"] == weights
    # a checkpoint trained with --ema 0: the raw weights, said so in the provenance
    no_ema = write_checkpoint(tmp_path / "no_ema.pt", raw, ema=None)
    assert export(no_ema, tmp_path / "n.pt", "--weights", "ema")["source"]["weights"] == "raw"


def test_a_real_pretrain_checkpoint_exports(tmp_path):
    argv = ["--model", "vit_tiny", "--synthetic-size", "48", "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "0.5", "--lr", "1e-3", "--num-workers", "0", "--pca-images", "48",
            "--pca-center", "--output-dir", str(tmp_path), "--log-every", "100"]
    pretrain.main(pretrain.get_args_parser().parse_args(argv))
    ck = str(tmp_path / "checkpoint.pt")
    export(ck, tmp_path / "vit.pt")
    vit, saved = timm_from_file(tmp_path / "vit.pt")
    model = registry.model_from_checkpoint(registry.load(ck), "ema")
    x = images(4, 32)
    with torch.no_grad():
        want = model.forward_features(x)
    assert (timm_features(vit, x) - want).abs().max().item() < TOL
    assert saved["source"]["step"] == 6 and saved["source"]["pca_center"]


def test_self_check_catches_a_wrong_fold(tmp_path, monkeypatch):
    model = random_model("vit_tiny", seed=6)
    ck = write_checkpoint(tmp_path / "checkpoint.pt", model, ema=model)
    conv = model.x_embedder.proj
    # a bug: the PCA projection left out of the patch embedding
    monkeypatch.setattr(export_timm, "fold_patch_embed", lambda m: (conv.weight, conv.bias))
    with pytest.raises(RuntimeError, match="self-check failed"):
        export(ck, tmp_path / "vit.pt")
    assert not (tmp_path / "vit.pt").exists() and not (tmp_path / "vit.pt.tmp").exists()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export(tmp_path / "missing.pt", tmp_path / "vit.pt")
    model = random_model("vit_tiny")
    ck = write_checkpoint(tmp_path / "checkpoint.pt", model)
    with pytest.raises(UserError, match="output folder"):
        export(ck, tmp_path / "no" / "vit.pt")
    with pytest.raises(UserError, match="--probe-depth must be in 1..4"):
        export(ck, tmp_path / "vit.pt", "--probe-depth", "5")
    with pytest.raises(UserError, match="--probe-t must be in 0..999"):
        export(ck, tmp_path / "vit.pt", "--probe-t", "1000")
    assert not (tmp_path / "vit.pt").exists()


def test_dit_checkpoint_exits_2_with_one_error_line(tmp_path):
    pca = random_pca(4, 32, False)
    dit = dit_baseline.build_model("dit_tiny_1", pca, latent_dim=8)
    ck = write_checkpoint(tmp_path / "dit.pt", dit)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export_timm.py"), ck,
                        "--out", str(tmp_path / "vit.pt")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "only l-DAE checkpoints export" in r.stderr
    assert not (tmp_path / "vit.pt").exists()
