"""Tests for dit_baseline.py (CPU, tiny models; the big sizes are built on the meta device)."""
import math

import pytest
import torch

import bench_train
import dit_baseline as db
import ldae
import pretrain
from tokenizer_pca import PatchPCA
from util import datasets, registry
from util.cli import UserError


def random_pca(patch=8, img=32, seed=0):
    """A PatchPCA with a random orthonormal basis (a fitted one is not needed for these tests)."""
    D = patch * patch * 3
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    return PatchPCA(q.T.contiguous(), torch.linspace(2, 1, D), None, patch, 3, img)


def images(n=4, img=32, seed=0):
    return torch.rand(n, 3, img, img, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def latents_file(tmp_path):
    p = str(tmp_path / "lat.pt")
    torch.save({"latents": torch.randn(8, 4, 8, 8).half(), "labels": torch.arange(8) % 3}, p)
    return p


# --- sizes and official DiT compatibility -----------------------------------------------------
# DiT paper / official train.py log: XL/2 675,129,632 parameters (pos_embed included, as the
# official nn.Parameter(requires_grad=False)); S/2 33M, B/2 130M, L/2 458M; XL/2 118.6 GFLOPs.
@pytest.mark.parametrize("name,millions", [("dit_s_2", 33), ("dit_b_2", 130), ("dit_l_2", 458),
                                           ("dit_xl_2", 675)])
def test_official_sizes(name, millions):
    with torch.device("meta"):
        m = db.build_model(name, input="latents", latent_channels=4, latent_size=32,
                           class_cond=True, num_classes=1000, learn_sigma=True)
    n = sum(p.numel() for p in m.parameters()) + m.pos_embed.numel()
    assert abs(n / 1e6 - millions) / millions < 0.01
    if name == "dit_xl_2":
        assert n == 675_129_632
        # forward FLOPs (2 x MACs) vs the DiT paper's 118.6 GFLOPs (MACs)
        assert abs(bench_train.train_flops_per_image(m) / 3 / 2 / 118.6e9 - 1) < 0.02


def official_keys(depth):
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    keys |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for b in range(depth):
        keys |= {f"blocks.{b}.{m}.{w}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                                 "adaLN_modulation.1") for w in ("weight", "bias")}
    return keys


def test_official_state_dict_names_and_shapes():
    kw = dict(input="latents", latent_channels=4, latent_size=32, class_cond=True, num_classes=1000,
              learn_sigma=True)
    with torch.device("meta"):
        m = db.build_model("dit_s_2", **kw)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("pca.")}
    assert set(sd) == official_keys(12)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 384)     # + null class
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 384)         # learn_sigma: 2 C
    assert sd["pos_embed"].shape == (1, 256, 384)


def test_unconditional_has_no_label_embedder():
    m = db.build_model("dit_tiny_1", random_pca(4))
    assert not hasattr(m, "y_embedder") and not any("y_embedder" in k for k in m.state_dict())


def test_init_is_adaln_zero():
    m = db.build_model("dit_tiny_1", random_pca(4), class_cond=True, num_classes=3)
    assert m.blocks[0].adaLN_modulation[1].weight.abs().sum() == 0
    assert m.final_layer.linear.weight.abs().sum() == 0
    assert 0.01 < m.y_embedder.embedding_table.weight.std() < 0.03                # N(0, 0.02)


# --- schedules and objective ------------------------------------------------------------------
def test_ddpm_schedule_closed_form():
    g, s = db.make_schedule("ddpm")
    beta = 1e-4 + (0.02 - 1e-4) * torch.arange(1000, dtype=torch.float64) / 999
    alphas_cumprod = torch.exp(torch.cumsum(torch.log1p(-beta), 0))
    torch.testing.assert_close(g.square(), alphas_cumprod, rtol=1e-10, atol=1e-12)
    assert g[0].square().item() == pytest.approx(1 - 1e-4)
    assert g[-1].square().item() == pytest.approx(4.036e-5, rel=1e-3)   # DDPM's last level
    torch.testing.assert_close(g.square() + s.square(), torch.ones(1000, dtype=torch.float64))


def test_linear_gamma2_and_no_scaling():
    g, s = db.make_schedule("linear_gamma2")
    g2 = g.square()
    assert g2[0].item() == pytest.approx(0.999) and g2[-1].item() == pytest.approx(0.5 / 1000)
    torch.testing.assert_close(g2[1:-1] - g2[:-2], torch.full((998,), -1e-3, dtype=torch.float64))
    torch.testing.assert_close(g2 + s.square(), torch.ones(1000, dtype=torch.float64))
    g, s = db.make_schedule("no_scaling")
    assert torch.all(g == 1) and s[0] == 0
    m = ldae.build_model("vit_tiny")                         # same sigma as l-DAE (RECIPE s3)
    t = torch.arange(1000)
    torch.testing.assert_close(s.float(), m.sigma(t))
    with pytest.raises(ValueError, match="unknown schedule"):
        db.make_schedule("cosine")


@pytest.mark.parametrize("schedule", db.SCHEDULES)
@pytest.mark.parametrize("prediction", db.PREDICTIONS)
def test_perfect_prediction_has_zero_loss(schedule, prediction, monkeypatch):
    m = db.build_model("dit_tiny_1", random_pca(4), schedule=schedule, prediction=prediction,
                       learn_sigma=True, class_cond=True, num_classes=5)
    x, y = images(), torch.tensor([0, 1, 2, 4])
    z0, seen = m.encode(x), {}
    add_noise = m.add_noise

    def recording(z, t, eps=None):
        seen["xt"], seen["eps"] = add_noise(z, t, eps)
        return seen["xt"], seen["eps"]

    monkeypatch.setattr(m, "add_noise", recording)
    target = lambda: seen["eps"] if prediction == "eps" else z0
    junk = torch.randn_like(z0) * 100                        # the variance half must be ignored
    monkeypatch.setattr(m, "forward", lambda xt, t, y=None: torch.cat([target(), junk], 1))
    assert m.loss(x, y).item() == pytest.approx(0, abs=1e-10)
    monkeypatch.setattr(m, "forward", lambda xt, t, y=None: torch.cat([target() + 0.5, junk], 1))
    assert m.loss(x, y).item() > 1e-3                       # and an imperfect one is not zero


@pytest.mark.parametrize("schedule,t", [("ddpm", 500), ("linear_gamma2", 300), ("no_scaling", 700)])
def test_x0_loss_weight(schedule, t, monkeypatch):
    """Table 3: lambda_t = gamma_t^2 (row 2, VP schedules), 1 / (1 + sigma_t^2) (row 3)."""
    m = db.build_model("dit_tiny_1", random_pca(4), schedule=schedule, prediction="x0")
    x = images()
    monkeypatch.setattr(m, "sample_t", lambda B, dev: torch.full((B,), t))
    monkeypatch.setattr(m, "forward", lambda xt, t, y=None: torch.zeros_like(xt))
    g, s = db.make_schedule(schedule)
    lam = 1 / (1 + s[t] ** 2) if schedule == "no_scaling" else g[t] ** 2
    expected = lam.item() * m.encode(x).square().mean().item()
    assert m.loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_class_cond_needs_labels_in_range():
    m = db.build_model("dit_tiny_1", random_pca(4), class_cond=True, num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        m.loss(images())
    with pytest.raises(ValueError, match="num_classes"):
        m.loss(images(), torch.tensor([0, 1, 2, 3]))


# --- latent geometry --------------------------------------------------------------------------
def test_pca_latent_layout_and_pixel_row():
    pca = random_pca(8)
    m = db.build_model("dit_tiny_1", pca, patch_size=8, latent_dim=16, latent_norm="none")
    x = images(2)
    z = m.encode(x)
    assert z.shape == (2, 16, 4, 4)
    torch.testing.assert_close(z[:, :, 1, 2], pca.encode(x, 16)[:, 1 * 4 + 2])  # row-major tokens
    torch.testing.assert_close(m.decode(z), pca.project(x, 16), atol=1e-5, rtol=1e-5)
    px = db.build_model("dit_tiny_1", pca, patch_size=8, latent_dim=0,      # pixel: all D
                        latent_norm="none")
    assert px.config["latent_dim"] == 192 and px.x_embedder.proj.in_channels == 192
    torch.testing.assert_close(px.decode(px.encode(x)), x, atol=1e-5, rtol=1e-5)  # a rotation


def test_bad_configs_raise_user_errors():
    with pytest.raises(ValueError, match="exceeds D"):
        db.build_model("dit_tiny_1", random_pca(4), latent_dim=64)
    with pytest.raises(ValueError, match="does not tile"):
        db.build_model("dit_tiny_2", random_pca(8, 24), img_size=24, patch_size=8)   # 3x3 grid
    with pytest.raises(ValueError, match="patches"):
        db.build_model("dit_tiny_1", random_pca(8))                                  # wants 4 px
    with pytest.raises(ValueError, match="true or false"):
        db.build_model("dit_tiny_1", random_pca(4), class_cond="maybe")
    assert db.build_model("dit_tiny_1", random_pca(4), class_cond="False").class_cond is False
    with pytest.raises(KeyError):
        db.build_model("dit_huge_2")


class Gadget:            # a class a pickle can name: loading it would run code
    def __reduce__(self):
        return (print, ("this would have run",))


def test_latent_file_and_build_from_it(latents_file, tmp_path):
    ds = datasets.open_latents(latents_file)
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (4, 8, 8) and y == 0
    assert datasets.num_classes(ds) == 3
    m = registry.build_model("dit_tiny_2", None, latents_file=latents_file, class_cond=True)
    assert m.config["input"] == "latents" and m.config["num_classes"] == 3
    assert m.x_embedder.proj.in_channels == 4 and m.pos_embed.shape[1] == 16
    xb = torch.stack([ds[i][0] for i in range(4)])
    assert torch.equal(m.encode(xb), xb)                      # latents go in as they are
    assert m.denoise(xb, 100)[1].shape == (4, 3, 8, 8)        # false-colour view for grids
    with pytest.raises(UserError, match="--latents-file"):
        datasets.LatentFile(None)
    with pytest.raises(UserError, match="does not exist"):
        datasets.LatentFile(str(tmp_path / "nope.pt"))
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="'latents'"):
        datasets.LatentFile(str(tmp_path / "bad.pt"))
    torch.save({"latents": Gadget(), "labels": torch.zeros(1)}, str(tmp_path / "evil.pt"))
    with pytest.raises(UserError) as refused:
        datasets.LatentFile(str(tmp_path / "evil.pt"))
    assert "refused" in str(refused.value) and "would run" in str(refused.value)
    assert "weights_only" not in str(refused.value)


# --- probe and grids --------------------------------------------------------------------------
def test_forward_features_contract():
    m = db.build_model("dit_tiny_1", random_pca(4), class_cond=True, num_classes=4)
    m.init_weights(active=True)                               # live blocks, so labels would matter
    m.eval()                                                  # no label dropout in the check below
    x, y = images(), torch.tensor([0, 1, 2, 3])
    f = m.forward_features(x)
    assert f.shape == (4, 64)
    tt = torch.full((4,), 10)
    z = m.gamma[10] * m.encode(x)                             # clean input at level 10
    null = m(z, tt, None, depth=2).mean(1)                    # default depth = 4 // 2
    torch.testing.assert_close(f, null)
    assert not torch.allclose(f, m(z, tt, y, depth=2).mean(1))   # true labels would change it
    f1, f3 = m.forward_features(x, depth=[1, 3])
    torch.testing.assert_close(f3, m.forward_features(x, depth=3))
    assert not torch.allclose(m.forward_features(x, noisy=True), f)


def test_denoise_with_a_perfect_network_recovers_the_projection(monkeypatch):
    pca = random_pca(4)
    m = db.build_model("dit_tiny_1", pca, latent_dim=8, schedule="linear_gamma2")
    x = images(2)
    seen = {}
    add_noise = m.add_noise
    def remembered_noise(z, t, eps=None):
        return seen.setdefault("r", add_noise(z, t, eps))
    monkeypatch.setattr(m, "add_noise", remembered_noise)
    monkeypatch.setattr(m, "forward", lambda xt, t, y=None: seen["r"][1])    # true eps
    noisy, den = m.denoise(x, 400)
    assert noisy.shape == den.shape == x.shape
    torch.testing.assert_close(den, pca.project(x, 8), atol=1e-4, rtol=1e-4)


# --- presets ----------------------------------------------------------------------------------
def test_presets_cover_the_paper():
    for name in ["t1_dit_cond", "t1_no_cond", "t1_new_schedule", "t2_pixel", "t3_ldae",
                 "abl_single_level", "abl_random_crop", "final_vit_b", "final_vit_l"]:
        assert name in db.PRESETS
    assert {f"t2_pca_d{d}" for d in (8, 16, 32, 64, 128)} <= set(db.PRESETS)
    assert db.PRESETS["t3_pca_eps"] == db.PRESETS["t2_pca_d32"]
    for p in db.PRESETS.values():
        assert p["epochs"] >= 400 and p["batch_size"] == 2048
        assert p["model"] in {**db.MODELS, **ldae.MODELS}


@pytest.mark.parametrize("name", sorted(db.PRESETS))
def test_every_preset_takes_a_training_step(name, latents_file):
    preset = db.PRESETS[name]
    family = registry.family_of(preset["model"])
    module = db if family == "dit" else ldae
    ov = {k: v for k, v in preset.items() if k in module.MODEL_FLAGS}
    if preset.get("latents_file", 0) is None:                 # Table 1: the user's latents
        ov["latents_file"] = latents_file
    torch.manual_seed(0)
    small = {"dit": "dit_tiny_1", "ldae": "vit_tiny"}[family]   # the row at toy size
    model = registry.build_model(small, random_pca(8), img_size=32, patch_size=8, **ov)
    for k in ("schedule", "prediction", "target", "noise", "latent_dim", "class_cond"):
        if k in ov and not (k == "latent_dim" and ov[k] == 0):   # 0 = all D (pixel row)
            assert model.config[k] == ov[k], k               # the preset really set the row
    if model.config.get("input") == "latents":
        ds = datasets.open_latents(latents_file)
        x, y = torch.stack([ds[i][0] for i in range(4)]), torch.tensor([ds[i][1] for i in range(4)])
    else:
        x, y = images(), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model.loss(x, y)
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert model.final_layer.linear.weight.abs().sum() > 0   # zero-init output moved: a real step


def test_preset_runs_through_pretrain_and_checkpoint(tmp_path):
    """A DiT row end to end at toy scale: pretrain.main -> checkpoint -> rebuilt model's
    features."""
    out = str(tmp_path / "run")
    args = pretrain.get_args_parser().parse_args(
        ["--preset", "t3_no_input_scaling", "--model", "dit_tiny_1", "--input-size", "32",
         "--patch-size", "4", "--latent-dim", "8", "--epochs", "1", "--max-steps", "1",
         "--batch-size", "8", "--warmup-epochs", "0", "--synthetic-size", "16",
         "--pca-images", "16", "--num-workers", "0", "--output-dir", out])
    assert args.prediction == "x0" and args.schedule == "no_scaling" and args.latent_dim == 8
    pretrain.main(args)
    m = registry.model_from_checkpoint(registry.load(out + "/checkpoint.pt"))
    assert m.config["family"] == "dit" and m.config["prediction"] == "x0" and m.C == 8
    assert m.forward_features(images(2)).shape == (2, 64)


def test_conditioning_ratio_quarter_in_paper_rows_full_in_the_registry():
    m = db.build_model("dit_tiny_1", random_pca(4), cond_ratio=0.25, class_cond=True, num_classes=3)
    assert m.t_embedder.mlp[2].out_features == 16                   # 64 / 4
    assert m.blocks[0].adaLN_modulation[1].in_features == 16
    assert m.y_embedder.embedding_table.weight.shape == (4, 16)
    m.loss(images(2, 32), torch.tensor([0, 2])).backward()          # it trains
    assert db.build_model("dit_tiny_1", random_pca(4)).config["cond_ratio"] == 1.0
    for name, preset in db.PRESETS.items():                         # every paper DiT row: 1/4
        if registry.family_of(preset["model"]) == "dit":
            assert preset["cond_ratio"] == 0.25, name


def test_the_pca_latent_is_scaled_to_unit_mean_second_moment_by_default():
    # the variance-preserving schedules assume a unit-variance latent (DiT scales its VAE latent
    # by one fixed factor): a DiT on the PCA latent defaults to "global", a file's latents to none
    pca = random_pca(4)
    m = db.build_model("dit_tiny_1", pca, latent_dim=6)
    assert m.config["latent_norm"] == "global"
    second_moment = (m.latent_gain().double() ** 2 * pca.eigenvalues[:6].double()).mean()
    assert second_moment.item() == pytest.approx(1.0, rel=1e-5)
    latents = db.build_model("dit_tiny_2", None, input="latents", latent_channels=4, latent_size=8)
    assert latents.config["latent_norm"] == "none"


def test_dit_applies_the_same_latent_norm_as_ldae():
    import ldae
    pca = random_pca(4)
    x = images(2, 32)
    for norm in ("none", "global", "whiten"):
        dit = db.build_model("dit_tiny_1", pca, latent_dim=6, latent_norm=norm)
        vit = ldae.build_model("vit_tiny", pca, latent_dim=6, latent_norm=norm)
        assert torch.equal(dit.latent_gain(), vit.latent_gain())
        z = pca.encode(x, 6, vit.latent_gain())                     # (B, L, 6)
        assert torch.allclose(dit.encode(x), z.transpose(1, 2).reshape(2, 6, 8, 8), atol=1e-6)
        assert torch.allclose(dit.decode(dit.encode(x)), pca.project(x, 6), atol=1e-5)


def test_table4_presets_are_the_final_1600_epoch_rows():
    assert set(db.TABLE4_PRESETS) == {"final_vit_b_1600ep", "final_vit_l_1600ep"}
    assert all(db.PRESETS[name]["epochs"] == 1600 for name in db.TABLE4_PRESETS)
