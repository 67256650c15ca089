# Tests for tokenizer_pca.py (RECIPE s2). CPU, tiny: patches of 4x4x3 (D = 48).
import json
import os

import numpy as np
import pytest
import torch

import tokenizer_pca as tp
from util import cli, files, synthetic, transforms
from tokenizer_pca import PatchPCA, fit_pca


def _images(n=40, size=16, seed=0):
    # Smooth-ish random images (cumulative sums): correlated pixels like real images, distinct
    # eigenvalues.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).cumsum(-1).cumsum(-2) / size
    return x.clamp(-3, 3) / 3  # (n, 3, size, size) in [-1, 1]


def _patches_np(x, p):
    """Reference patchify in numpy with explicit loops in (p, q, c) order."""
    B, C, H, W = x.shape
    out = np.zeros((B, (H // p) * (W // p), p * p * C))
    xn = x.numpy()
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                k = 0
                for pi in range(p):
                    for qi in range(p):
                        for c in range(C):
                            out[b, i * (W // p) + j, k] = xn[b, c, i * p + pi, j * p + qi]
                            k += 1
    return out


@pytest.fixture(scope="module")
def fitted():
    x = _images()
    return x, fit_pca(x, 4, progress=False, device="cpu", gemm_dtype=torch.float64)


def test_patchify_order_and_inverse():
    x = _images(3, 8)
    pca = PatchPCA.empty(4, 3, 8)
    P = pca.patchify(x)
    assert P.shape == (3, 4, 48)
    np.testing.assert_array_equal(P.numpy(), _patches_np(x, 4).astype(np.float32))
    assert torch.equal(pca.unpatchify(P), x)
    # non-square: explicit h, w
    x2 = _images(2, 8)[..., :4]  # (2, 3, 8, 4)
    assert torch.equal(pca.unpatchify(pca.patchify(x2), 2, 1), x2)


def test_orthonormal_and_exact_full_reconstruction(fitted):
    x, pca = fitted
    V = pca.components.double()
    assert torch.allclose(V @ V.T, torch.eye(48, dtype=torch.float64), atol=1e-5)
    assert torch.all(pca.eigenvalues[:-1] >= pca.eigenvalues[1:])  # descending
    assert torch.allclose(pca.project(x, 48), x, atol=1e-5)
    assert not torch.allclose(pca.project(x, 8), x, atol=1e-2)  # d < D really drops something


def test_matches_numpy_eigh_and_svd(fitted):
    x, pca = fitted
    X = _patches_np(x, 4).reshape(-1, 48)
    M = X.T @ X / len(X)  # uncentred second moment (the default)
    w, v = np.linalg.eigh(M)
    w, v = w[::-1], v[:, ::-1].T
    np.testing.assert_allclose(pca.eigenvalues.numpy(), w, rtol=1e-4, atol=1e-6 * w[0])
    for k in range(8):  # top components, up to sign
        cosine = float(np.dot(pca.components[k].double().numpy(), v[k]))
        assert abs(cosine) == pytest.approx(1, abs=1e-5)
    _, s, vt = np.linalg.svd(X, full_matrices=False)  # same thing via the SVD of the data
    np.testing.assert_allclose(pca.eigenvalues.numpy()[:8], (s ** 2 / len(X))[:8], rtol=1e-4)
    cosine = float(np.dot(pca.components[0].double().numpy(), vt[0]))
    assert abs(cosine) == pytest.approx(1, abs=1e-5)


def test_float32_gemm_path_close_to_float64(fitted):
    # CPU default multiplies in float32 (speed) and adds in float64; must agree with float64.
    x, pca64 = fitted
    pca32 = fit_pca(x, 4, progress=False, device="cpu")
    atol = 1e-6 * float(pca64.eigenvalues[0])
    assert torch.allclose(pca32.eigenvalues, pca64.eigenvalues, rtol=1e-4, atol=atol)
    dots = (pca32.components[:8] * pca64.components[:8]).sum(1).abs()
    assert torch.allclose(dots, torch.ones(8), atol=1e-4)


def test_centered_matches_numpy_cov():
    x = _images() * 0.5 + 0.3  # non-zero mean so centring matters
    pca = fit_pca(x, 4, center=True, progress=False, device="cpu", gemm_dtype=torch.float64)
    X = _patches_np(x, 4).reshape(-1, 48)
    w = np.linalg.eigh(np.cov(X.T, bias=True))[0][::-1]
    np.testing.assert_allclose(pca.eigenvalues.numpy(), w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(pca.mean.numpy(), X.mean(0), atol=1e-6)
    assert torch.allclose(pca.project(x, 48), x, atol=1e-5)


def test_encode_decode_shapes_scale_and_coords(fitted):
    x, pca = fitted
    pca.scale = 2.5
    try:
        z = pca.encode(x[:2], 8)
        assert z.shape == (2, 16, 8)
        assert pca.decode(z).shape == (2, 3, 16, 16)
        z_full = pca.encode(x[:2])
        assert torch.allclose(pca.decode(z_full), x[:2], atol=1e-5)  # round trip with scale
        P = pca.patchify(x[:2])
        assert torch.allclose(z_full, 2.5 * pca.coords(P), atol=1e-5)  # coords: no scale, no mean
    finally:
        pca.scale = 1.0


def test_dropped_energy_equals_dropped_eigenvalues(fitted):
    # On the fitting data, E||x - P_d x||^2 per patch = sum of the eigenvalues beyond d.
    x, pca = fitted
    for d in (4, 16, 32):
        err = (pca.patchify(x - pca.project(x, d)) ** 2).sum(-1).mean()
        assert float(err) == pytest.approx(float(pca.eigenvalues[d:].sum()), rel=1e-3)
    assert pca.explained(48) == pytest.approx(1.0)
    assert 0 < pca.explained(4) < pca.explained(16) < 1


def test_save_load_roundtrip_weights_only(fitted, tmp_path):
    _, pca = fitted
    pca.meta["note"] = "x"
    p = str(tmp_path / "pca.pt")
    files.save_torch(pca.to_dict(), p)
    assert not os.path.exists(p + ".tmp")
    raw = torch.load(p, weights_only=True)
    assert raw["patch_size"] == 4 and raw["meta"]["num_images"] == 40
    q = PatchPCA.load(p)
    assert torch.equal(q.components, pca.components) and torch.equal(q.eigenvalues, pca.eigenvalues)
    assert (q.patch_size, q.channels, q.img_size, q.center, q.scale) == (4, 3, 16, False, 1.0)
    # Inside a model's state_dict the non-tensor attributes travel too (extra state).
    pca.scale = 0.5
    sd = torch.nn.Sequential(pca).state_dict()
    torch.save(sd, p)
    m = torch.nn.Sequential(PatchPCA.empty(4, 3, 16))
    m.load_state_dict(torch.load(p, weights_only=True))
    assert m[0].scale == 0.5 and torch.equal(m[0].components, pca.components)
    pca.scale = 1.0


def test_fit_deterministic_and_seed_dependent():
    center = transforms.build_transform("center", 16)
    ds = synthetic.SyntheticShapes(24, 16, seed=3, transform=center)
    kw = dict(patches_per_image=3, progress=False, device="cpu", batch_size=8)
    a = fit_pca(ds, 4, num_images=16, seed=1, **kw)
    b = fit_pca(ds, 4, num_images=16, seed=1, **kw)
    c = fit_pca(ds, 4, num_images=16, seed=2, **kw)
    assert torch.equal(a.components, b.components) and torch.equal(a.eigenvalues, b.eigenvalues)
    assert not torch.allclose(a.eigenvalues, c.eigenvalues)
    assert a.meta["num_images"] == 16 and a.meta["num_patches"] == 16 * 3


def test_cli_smoke(tmp_path, capsys):
    out = str(tmp_path / "pca.pt")
    args = tp.get_args_parser().parse_args(
        ["--dataset", "synthetic", "--synthetic-size", "40", "--input-size", "16",
         "--patch-size", "4", "--num-images", "30", "--num-workers", "0", "--out", out])
    res = tp.main(args)
    for f in (out, str(tmp_path / "pca_components.png"), str(tmp_path / "pca_recon.png")):
        assert os.path.getsize(f) > 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == json.loads(json.dumps(res))
    assert summary["images"] == 30 and summary["patches"] == 30 * 16
    assert set(summary["explained_pct"]) == {"8", "16", "32"}  # only the Table 2 d's <= D = 48
    pca = PatchPCA.load(out)
    assert pca.meta["dataset"] == "synthetic" and pca.meta["seconds"] > 0 and pca.dim == 48


def test_cli_user_errors(tmp_path):
    parse = tp.get_args_parser().parse_args
    with pytest.raises(cli.UserError, match="not a multiple of --patch-size"):
        tp.main(parse(["--input-size", "30", "--patch-size", "4", "--out", str(tmp_path / "p.pt")]))
    with pytest.raises(cli.UserError, match="does not exist"):
        tp.main(parse(["--input-size", "16", "--patch-size", "4",
                       "--out", str(tmp_path / "no" / "p.pt")]))
