"""The l-DAE network and objective (ldae.py) against RECIPE s3-s5, on tiny CPU configs."""
import math

import pytest
import torch

import bench_train
import ldae
from tokenizer_pca import PatchPCA


def random_pca(patch_size=4, channels=3, img_size=32, seed=0):
    """A PatchPCA with a random orthonormal basis (rows), so any mix-up of rows/columns or of
    the patch flattening order shows up (the identity basis would hide it)."""
    pca = PatchPCA.empty(patch_size, channels, img_size)
    g = torch.Generator().manual_seed(seed)
    D = patch_size * patch_size * channels
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    pca.components.copy_(q.T.float())
    pca.eigenvalues.copy_(torch.linspace(D, 1, D))
    return pca


def tiny(**kw):
    torch.manual_seed(0)
    return ldae.build_model("vit_tiny", random_pca(), **kw)


def images(b=4, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_dit_parameter_names():
    keys = set(tiny().state_dict())
    for k in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.3.mlp.fc1.weight",
              "blocks.3.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight", "pos_embed",
              "pca.components"]:
        assert k in keys, k


def test_vit_b_sizes_like_the_paper():
    # RECIPE s4: ViT-B encoder (12 blocks, 768 wide) + an equal decoder; the conditioning MLP is
    # 1/4 of DiT's. Without the t-conditioning (constant at a fixed t) the encoder is a ViT-B.
    with torch.device("meta"):
        m = ldae.build_model("vit_b")
    assert m.depth == 24 and m.blocks[0].attn.num_heads == 12
    def in_encoder(key):
        if key.startswith("x_embedder"):
            return True
        return key.startswith("blocks.") and int(key.split(".")[1]) < 12 and "adaLN" not in key
    enc = sum(p.numel() for k, p in m.named_parameters() if in_encoder(k))
    assert 85e6 < enc < 87e6
    assert m.t_embedder.mlp[2].out_features == 768 // 4
    assert m.blocks[0].adaLN_modulation[1].in_features == 192
    # the MFU figures rest on it: ~276 GFLOPs per training image at 256 px
    assert 270e9 < bench_train.train_flops_per_image(m) < 285e9


def test_perfect_prediction_gives_zero_loss_for_every_target():
    x0 = images()
    for target in ["original", "projected", "latent"]:
        m = tiny(target=target)

        def perfect(x, t, depth=None, m=m):
            if target == "original":
                return m.pca.patchify(x0)
            if target == "projected":
                return m.pca.patchify(m.pca.project(x0, m.d))
            return m.pca.encode(x0, m.d, m.latent_gain())
        m.forward = perfect
        assert m.loss(x0).item() == pytest.approx(0.0, abs=1e-10), target


def test_loss_weights_residual_and_lambda():
    """An error of size 1 along an in-subspace basis vector costs 1, along a residual basis
    vector costs residual_weight; lambda_t = 1 / (1 + sigma_t^2) scales both."""
    m = tiny(residual_weight=0.1)
    x0 = images(2)
    V = m.pca.components                                              # (D, D), rows = basis
    t_fixed = 700
    m.sample_t = lambda b, device: torch.full((b,), t_fixed, dtype=torch.long)
    lam = 1 / (1 + (math.sqrt(2) * t_fixed / 1000) ** 2)

    def loss_with_error(direction):
        m.forward = lambda x, t, depth=None: m.pca.patchify(x0) + direction   # error on every token
        return m.loss(x0).item()

    inside = loss_with_error(V[0])                   # coordinate 1 <= d: weight 1
    outside = loss_with_error(V[m.d + 3])            # coordinate > d: weight 0.1
    assert inside == pytest.approx(lam * 1.0, rel=1e-5)
    assert outside == pytest.approx(lam * 0.1, rel=1e-5)


def test_noise_lives_in_the_latent_subspace():
    m = tiny(latent_norm="none")
    x0 = images(8)
    clean = m.add_noise(x0, torch.zeros(8, dtype=torch.long))        # sigma 0: V_d^T V_d x0
    torch.testing.assert_close(clean, m.pca.project(x0, m.d))
    t = torch.full((8,), 1000 // 2, dtype=torch.long)
    torch.manual_seed(0)
    noisy = m.add_noise(x0, t)
    delta = m.pca.coords(m.pca.patchify(noisy - clean))              # (B, L, D)
    assert delta[..., m.d:].abs().max() < 1e-4                       # nothing outside V_d
    # sigma_t = sqrt 2 * t / 1000 (RECIPE s3); the latent scale multiplies z, so divide it out
    expect = math.sqrt(2) / 2 / m.latent_scale
    assert delta[..., :m.d].std().item() == pytest.approx(expect, rel=0.1)


def test_single_level_noise_is_one_sigma():
    m = tiny(noise="single")
    t = m.sample_t(16, "cpu")
    assert (t == t[0]).all()
    assert torch.allclose(m.sigma(t), torch.full((16,), math.sqrt(1 / 3)))


def test_single_level_model_probes_a_clean_input_at_its_own_level():
    # "Clean" means sigma 0 for every model; a single-level model is probed by default at the one
    # level it was trained at (t = 408 for sigma = sqrt(1/3)), not at t = 10.
    m = tiny(noise="single").eval()
    m.init_weights(active=True)
    assert m.sigma(torch.tensor([0]))[0] == 0
    assert m.probe_t == m.single_t == 408
    x = images()
    with torch.no_grad():
        a, b = m.forward_features(x), m.forward_features(x)
        assert torch.equal(a, b)                                    # no noise in a clean input
        clean = m.pca.project(x, m.d)
        tt = torch.full((len(x),), 408)
        direct = m(clean, tt, depth=m.depth // 2).mean(1)
        assert torch.allclose(a, direct, atol=1e-5)
    assert tiny().probe_t == 10


@pytest.mark.parametrize("norm", ["none", "global", "whiten"])
def test_latent_norm_scales_the_latent_and_leaves_the_pca_alone(norm):
    pca = random_pca()
    m = ldae.build_model("vit_tiny", pca, latent_dim=8, latent_norm=norm, latent_scale=0.5)
    assert pca.scale == 1.0 and m.config["latent_norm"] == norm and m.config["latent_scale"] == 0.5
    ev = pca.eigenvalues[:8]
    gains = {"none": torch.ones(8), "global": ev.mean().rsqrt().expand(8), "whiten": ev.rsqrt()}
    expect = gains[norm]
    assert torch.allclose(m.latent_gain(), 0.5 * expect)
    # the noise in the latent coordinates is sigma_t eps: in PCA units it is sigma_t / gain
    x0 = images(64)
    t = torch.full((64,), 500)
    delta = m.pca.coords(m.pca.patchify(m.add_noise(x0, t) - m.pca.project(x0, 8)))[..., :8]
    ratio = delta.flatten(0, 1).std(0) * m.latent_gain() / (math.sqrt(2) / 2)
    assert torch.allclose(ratio, torch.ones(8), atol=0.1)


def test_global_and_whiten_give_unit_latents_on_the_fitted_data():
    from tokenizer_pca import fit_pca
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 3, 32, 32, generator=g) * 2 - 1) * torch.linspace(0.1, 1, 32)
    pca = fit_pca(x, 4, progress=False)
    for norm, check in [("global", lambda m2: m2.mean()), ("whiten", lambda m2: m2)]:
        z = pca.encode(x, 8, pca.latent_gain(8, norm))             # (B, L, 8)
        second_moment = z.square().flatten(0, 1).mean(0)           # (8,)
        assert torch.allclose(check(second_moment), torch.tensor(1.0), atol=1e-3), norm


def test_zero_gates_make_blocks_identity_and_active_init_does_not():
    m = tiny()
    x0 = images()
    embed = (m.x_embedder(m.pca.project(x0, m.d)) + m.pos_embed).mean(1)   # pooled patch embeddings
    torch.testing.assert_close(m.forward_features(x0), embed)
    m.init_weights(active=True)
    embed = (m.x_embedder(m.pca.project(x0, m.d)) + m.pos_embed).mean(1)
    assert (m.forward_features(x0) - embed).abs().max() > 1e-2


def test_clean_probe_input_is_the_projection_unless_the_raw_image_is_asked_for():
    m = tiny().eval()
    x = images()
    with torch.no_grad():
        projected = m.forward_features(x)
        raw = m.forward_features(x, clean="image")
        # the default feeds V_d^T V_d x: the same as handing that projection in as the image
        torch.testing.assert_close(projected,
                                   m.forward_features(m.pca.project(x, m.d), clean="image"))
    assert (projected - raw).abs().max() > 1e-3          # d < D: the raw image is another input
    with pytest.raises(ValueError, match="clean must be"):
        m.forward_features(x, clean="raw")


def test_forward_features_depth_list_matches_single_depths():
    m = tiny()
    m.init_weights(active=True)
    x0 = images()
    both = m.forward_features(x0, t=10, depth=[1, 2])
    torch.testing.assert_close(both[0], m.forward_features(x0, t=10, depth=1))
    # the default depth: the last encoder block
    torch.testing.assert_close(both[1], m.forward_features(x0, t=10))
    tokens = m(m.pca.project(x0, m.d), torch.full((4,), 10), depth=2)
    torch.testing.assert_close(both[1], tokens.mean(1))


def test_overfits_one_batch():
    # Smooth images (upsampled 4x4 noise) and a PCA fitted on their patches: the d = 4 latent
    # then holds most of each patch, as on natural images (RECIPE s2), and the tiny model can
    # memorise the batch.
    g = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=32,
                                         mode="bilinear", align_corners=False)
    pca = PatchPCA.empty(4, 3, 32)
    P = pca.patchify(x0).reshape(-1, 48).double()
    evals, evecs = torch.linalg.eigh(P.T @ P)
    pca.components.copy_(evecs.flip(1).T.float())
    torch.manual_seed(0)
    m = ldae.build_model("vit_tiny", pca)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = sum(m.loss(x0).item() for _ in range(5)) / 5
    for _ in range(200):
        loss = m.loss(x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = sum(m.loss(x0).item() for _ in range(5)) / 5
    assert last < first / 2


def test_grad_checkpoint_same_gradients():
    x0 = images()
    grads = []
    for gc in (False, True):
        m = tiny(grad_checkpoint=gc)
        m.init_weights(active=True)
        torch.manual_seed(3)
        m.loss(x0).backward()
        grads.append(m.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_analytic_flops_match_flop_counter():
    """The MFU figure rests on train_flops_per_image; hold it against torch's own
    FlopCounterMode on one forward + backward (the math SDPA path is counted as matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    m = tiny()
    m.init_weights(active=True)
    x = images(2).requires_grad_(True)     # so the patch embedding's backward counts in full
    t = torch.full((2,), 10)
    with FlopCounterMode(display=False) as fc:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            m(x, t).sum().backward()
    counted = fc.get_total_flops() / 2
    assert counted == pytest.approx(bench_train.train_flops_per_image(m), rel=0.05)


def test_registry():
    assert {"vit_tiny", "vit_small", "vit_b", "vit_half_l", "vit_l"} <= set(ldae.MODELS)
    with pytest.raises(KeyError, match="vit_b"):
        ldae.build_model("vit_q")
    m = tiny(latent_dim=8, residual_weight=0.0)
    assert m.config["latent_dim"] == 8 and m.config["family"] == "ldae"
    rebuilt = ldae.build_model(m.config["name"], None, **{k: v for k, v in m.config.items()
                                                          if k in ldae.MODEL_FLAGS})
    rebuilt.load_state_dict(m.state_dict())
    torch.testing.assert_close(rebuilt.forward_features(images()), m.forward_features(images()))
