"""linprobe.py on tiny CPU configs: LARS against its definition, the probe on separable
features, selection that never sees the test split, the frozen backbone, both protocols end to end
on checkpoints made by pretrain.main, the baselines, and every user error."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import ldae
import linprobe
import pretrain
from util import features, knn, lr_sched, probe_cached, synthetic, transforms
from util.lars import LARS
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pretrain_ckpt(out, *extra):
    """A vit_tiny checkpoint written by pretrain.main (32 px synthetic shapes, 4 px patches)."""
    argv = ["--model", "vit_tiny", "--synthetic-size", "48", "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "0.5", "--lr", "1e-3", "--ema", "0", "--num-workers", "0",
            "--pca-images", "48", "--output-dir", str(out), "--log-every", "100",
            "--save-every", "100", "--grid-every", "100", *extra]
    pretrain.main(pretrain.get_args_parser().parse_args(argv))
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return pretrain_ckpt(tmp_path_factory.mktemp("tiny"))


def probe_args(*argv):
    return linprobe.get_args_parser().parse_args(list(argv))


def probe(ckpt, out, *extra):
    """Small, fast probe settings: 120 train / 60 val synthetic images, 4 epochs."""
    checkpoint = []
    if ckpt:
        checkpoint = [ckpt]
    return linprobe.main(probe_args(*checkpoint, "--synthetic-size", "120",
                                    "--synthetic-val-size", "60", "--epochs", "4",
                                    "--warmup-epochs", "1", "--batch-size", "32",
                                    "--num-workers", "0", "--output-dir", str(out), *extra))


def blobs(n, d=16, c=4, seed=0, sep=4.0):
    """Linearly separable Gaussian blobs: (n, d) features, labels (n,); one dominant nuisance
    direction (scale 100) makes them badly conditioned, as network features are."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.arange(n) % c
    x = means[y] + torch.randn(n, d, generator=g)
    x[:, 0] += 100 * torch.randn(n, generator=g)
    return x, y


# ---------------------------------------------------------------------------------------------
# LARS, schedule, head
# ---------------------------------------------------------------------------------------------
def test_lars_matches_its_definition_step_by_step():
    torch.manual_seed(0)
    W, b, Z = torch.randn(3, 4), torch.randn(3), torch.zeros(2, 2)     # matrix, 1-D, zero matrix
    params = [p.clone().requires_grad_() for p in (W, b, Z)]
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.001
    opt = LARS(params, lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    ref = [W.clone(), b.clone(), Z.clone()]
    bufs = [torch.zeros_like(p) for p in ref]
    for step in range(4):
        grads = [torch.randn(p.shape) for p in ref]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(ref, grads)):             # the definition, by hand
            if p.ndim > 1:
                u = g + wd * p
                ratio = eta * p.norm() / u.norm() if p.norm() > 0 and u.norm() > 0 else 1.0
                u = u * ratio
            else:
                u = g                                              # no decay, no trust ratio
            bufs[i] = mom * bufs[i] + u
            ref[i] = p - lr * bufs[i]
        for p, r in zip(params, ref):
            assert torch.allclose(p.detach(), r, atol=1e-6), step
    # the 1-D parameter moved by exactly lr * (momentum sum of raw gradients): a big step, while
    # the weight matrix moved by ~ lr * eta * ||W|| per step only
    assert (params[1].detach() - b).abs().max() > 0.3
    assert (params[0].detach() - W).norm() < 4 * 10 * lr * eta * W.norm()


def test_what_the_papers_probe_lr_moves_under_lars():
    # The probe's lr is 6.4 (MAE: blr 0.1 x 16384 / 256) although the paper's text says 6.4e-3
    # (RECIPE.md s5). Under this LARS (trust eta 0.001, momentum 0.9) a weight matrix's step is a
    # fraction of its norm: lr * eta = 6.4e-3 in the first step (at lr 6.4e-3: 6.4e-6), whatever
    # the gradient's size; later steps move it by up to lr * eta / (1 - 0.9) for aligned
    # gradients and about lr * eta / sqrt(1 - 0.81) for uncorrelated ones; a bias moves by lr * g.
    args = linprobe.get_args_parser().parse_args(["--baseline", "pixels"])
    lr = args.blr * args.batch_size / 256
    assert lr == pytest.approx(6.4)
    for lr_tried, relative_move in ((lr, 6.4e-3), (6.4e-3, 6.4e-6)):
        torch.manual_seed(0)
        W = torch.randn(10, 768, requires_grad=True)
        start = W.detach().clone()
        W.grad = 1e3 * torch.randn(10, 768)
        LARS([W], lr=lr_tried, weight_decay=0.0).step()
        moved = (W.detach() - start).norm() / start.norm()
        assert moved.item() == pytest.approx(relative_move, rel=1e-4)

    def steady_move(aligned, lr=0.05, steps=120):
        # a small lr keeps ||W|| nearly constant, so the ratio to lr * eta is the momentum's gain
        generator = torch.Generator().manual_seed(1)
        W = torch.randn(10, 768, generator=generator).requires_grad_()
        fixed = torch.randn(10, 768, generator=generator)
        opt = LARS([W], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            before = W.detach().clone()
            W.grad = fixed if aligned else torch.randn(10, 768, generator=generator)
            opt.step()
        return ((W.detach() - before).norm() / before.norm()).item() / (lr * 1e-3)
    assert steady_move(aligned=True) == pytest.approx(1 / (1 - 0.9), rel=0.02)          # 10x
    assert steady_move(aligned=False) == pytest.approx((1 - 0.81) ** -0.5, rel=0.1)      # 2.3x
    bias = torch.zeros(5, requires_grad=True)
    bias.grad = torch.full((5,), 2.0)
    LARS([bias], lr=lr).step()
    assert torch.allclose(bias.detach(), torch.full((5,), -lr * 2.0))       # no trust ratio


def test_lr_schedule_and_head_init():
    f = lambda e: lr_sched.lr_at(e, 1, 6.4, 10, 90)  # noqa: E731
    assert f(0) == 0 and f(5) == pytest.approx(3.2) and f(10) == pytest.approx(6.4)
    assert f(50) == pytest.approx(3.2) and f(90) == pytest.approx(0, abs=1e-12)
    torch.manual_seed(0)
    head = linprobe.make_head(768, 1000)
    bn, lin = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert lin.weight.std().item() == pytest.approx(0.01, rel=0.05) and lin.bias.abs().max() == 0


# ---------------------------------------------------------------------------------------------
# The cached probe: accuracy, conditioning, selection
# ---------------------------------------------------------------------------------------------
def cached_args(*extra):
    return probe_args("--epochs", "30", "--warmup-epochs", "3", "--batch-size", "64", *extra)


@pytest.mark.parametrize("solver", ["lbfgs", "lars"])
def test_probe_reaches_high_accuracy_on_separable_features(solver):
    Xtr, ytr = blobs(400)
    Xva, yva = blobs(200, seed=1)
    args = cached_args("--solver", solver)
    state, top1, top5, info = probe_cached.probe_cached(
        Xtr[None], ytr, Xva, yva, args, 4, torch.device("cpu"), lambda rec: None, {},
        *linprobe.cached_solver(args, 1.0))
    assert top1 > 97 and top5 == 100 and info["heldout_top1"] > 95
    assert info["features_normalised"] == ("whitened" if solver == "lbfgs" else "standardised")
    # the saved head reproduces the score on raw features: (x - mean) @ map, then BN + Linear
    head = linprobe.make_head(state["feature_map"].shape[1], 4)
    head.load_state_dict(state["head"])
    head.eval()
    pred = head((Xva - state["feature_mean"]) @ state["feature_map"]).argmax(1)
    assert (pred == yva).float().mean().item() * 100 == pytest.approx(top1)


def test_selection_never_touches_the_test_split():
    Xtr, ytr = blobs(300, sep=0.8)                              # overlapping: choices matter
    Xva, yva = blobs(150, seed=1, sep=0.8)
    args = cached_args("--solver", "lars", "--lr-grid", "0.01,0.1,1,10")
    def run(val_labels):
        return probe_cached.probe_cached(Xtr[None], ytr, Xva, val_labels, args, 4,
                                         torch.device("cpu"), lambda rec: None, {},
                                         *linprobe.cached_solver(args, 1.0))
    s1, top1, _, info1 = run(yva)
    shuffled = torch.randperm(len(yva), generator=torch.Generator().manual_seed(5))
    s2, top1_garbage, _, info2 = run(yva[shuffled])
    assert info1["lr"] == info2["lr"] and info1["heldout_top1_by_lr"] == info2["heldout_top1_by_lr"]
    assert all(torch.equal(s1["head"][k], s2["head"][k]) for k in s1["head"])
    assert len(set(info1["heldout_top1_by_lr"].values())) > 1          # the grid did discriminate
    assert top1_garbage < top1 - 20                            # the val labels were indeed garbage


def test_whitening_makes_lbfgs_converge_on_badly_conditioned_features():
    Xtr, ytr = blobs(400)
    mu, P = probe_cached.feature_map(Xtr, whiten=True)
    Z = (Xtr - mu) @ P
    assert torch.allclose(Z.T @ Z / len(Z), torch.eye(P.shape[1]), atol=1e-3)
    dup = torch.cat([Xtr, Xtr], 1)                             # repeated channels: rank 16 of 32
    assert probe_cached.feature_map(dup, whiten=True)[1].shape == (32, 16)
    mu, P = probe_cached.feature_map(Xtr, whiten=False)
    assert torch.allclose(((Xtr - mu) @ P).std(0), torch.ones(16), atol=0.01)


# ---------------------------------------------------------------------------------------------
# End to end on pretrain.main checkpoints
# ---------------------------------------------------------------------------------------------
def test_cached_run_outputs_and_unchanged_backbone(ckpt, tmp_path, capsys):
    res = probe(ckpt, tmp_path, "--protocol", "cached", "--solver", "lars")
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(res))           # the LAST line is the JSON
    assert out[-2].startswith("top-1 ") and "top-5" in out[-2]
    assert res["protocol"] == "cached" and res["depth"] == 2 and res["t"] == 10
    assert res["backbone_unchanged"]
    assert res["selection"].startswith("best top-1 on a held-out 10% of train")
    logs = [json.loads(line) for line in open(tmp_path / "probe_log.jsonl")]
    assert [r["epoch"] for r in logs] == [1, 2, 3, 4]                    # a JSON line per epoch
    saved = torch.load(tmp_path / "head.pt", weights_only=True)
    assert set(saved["heads"]) == {"depth2_t10"} and saved["settings"]["top1"] == res["top1"]
    assert saved["heads"]["depth2_t10"]["head"]["1.weight"].shape == (10, 64)
    assert not any(k.startswith("blocks") for k in saved["heads"]["depth2_t10"]["head"])


def test_a_backbone_that_changes_is_caught(ckpt, tmp_path, monkeypatch):
    orig = ldae.LDAE.forward_features

    def sneaky(self, *args, **kwargs):                         # a bug that updates a weight
        self.blocks[0].attn.qkv.weight.data.add_(1e-3)
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(ldae.LDAE, "forward_features", sneaky)
    with pytest.raises(RuntimeError, match="frozen backbone"):
        probe(ckpt, tmp_path, "--protocol", "cached", "--wd-grid", "1e-3")


def test_cached_and_mae_protocols_agree(ckpt, tmp_path):
    # Same model, data, head, LARS, lr and schedule (30 epochs x 11 steps: near convergence); the
    # differences are the protocols' own: mae sees random crops and BN batch statistics, cached the
    # center crop and standardised features. Overlapping classes (~80%), so agreement means
    # something.
    root = write_colour_folder(tmp_path / "colours", jitter=0.2)
    common = ("--random-init", "--dataset", "imagefolder", "--data-path", root,
              "--input-size", "32", "--epochs", "30", "--warmup-epochs", "3", "--batch-size", "16",
              "--lr", "2.0")
    mae = probe(ckpt, tmp_path / "mae", "--protocol", "mae", *common)
    cached = probe(ckpt, tmp_path / "cached", "--protocol", "cached", "--solver", "lars",
                   "--lr-grid", "1", *common)
    assert mae["lr"] == cached["lr"] == 2.0 and mae["solver"] == cached["solver"]
    assert 60 < mae["top1"] < 97 and 60 < cached["top1"] < 97            # measured: 82.5 and 82.5
    assert abs(mae["top1"] - cached["top1"]) <= 8                         # 120 val images


def test_dit_baseline_checkpoint_probes_too(tmp_path):
    ck = pretrain_ckpt(tmp_path / "dit", "--model", "dit_tiny_1")
    res = probe(ck, tmp_path / "out", "--protocol", "cached", "--wd-grid", "1e-3")
    assert res["features"].startswith("dit_tiny_1 checkpoint") and res["depth"] == 2
    assert res["backbone_unchanged"]
    with pytest.raises(UserError, match="--clean-input would be ignored off an l-DAE"):
        probe(ck, tmp_path / "raw", "--protocol", "cached", "--clean-input", "image")


def test_clean_input_image_reaches_the_model_and_is_reported(ckpt, tmp_path, monkeypatch):
    seen = []
    orig = ldae.LDAE.forward_features

    def spy(self, x, **kw):
        seen.append(kw.get("clean", "projected"))
        return orig(self, x, **kw)
    monkeypatch.setattr(ldae.LDAE, "forward_features", spy)
    res = probe(ckpt, tmp_path, "--protocol", "cached", "--wd-grid", "1e-3",
                "--clean-input", "image")
    assert res["clean_input"] == "image" and seen and set(seen) == {"image"}
    with pytest.raises(UserError, match="--clean-input would be ignored with --noisy-input"):
        probe(ckpt, tmp_path / "noisy", "--noisy-input", "--clean-input", "image")


def test_grid_one_pass_per_t_and_a_table(ckpt, tmp_path, monkeypatch, capsys):
    calls = []
    orig = ldae.LDAE.forward_features
    def counted(self, x, t=10, depth=None, noisy=False):
        calls.append((t, tuple(depth)))
        return orig(self, x, t, depth, noisy)
    monkeypatch.setattr(ldae.LDAE, "forward_features", counted)
    res = probe(ckpt, tmp_path, "--grid", "--grid-depths", "1,2", "--grid-ts", "0,50",
                "--wd-grid", "1e-3")
    assert sorted(set(calls)) == [(0, (1, 2)), (50, (1, 2))]             # all depths in each pass
    assert len(calls) == 2 * 2                                 # one pass per t, train + val
    assert {(r["depth"], r["t"]) for r in res["grid"]} == {(1, 0), (1, 50), (2, 0), (2, 50)}
    best = max(res["grid"], key=lambda r: r["heldout_top1"])   # headline: chosen on held-out
    assert (res["depth"], res["t"]) == (best["depth"], best["t"])
    assert "depth \\ t" in capsys.readouterr().out
    assert len(torch.load(tmp_path / "head.pt", weights_only=True)["heads"]) == 4


def test_select_setting_chooses_t_and_input_on_heldout_train(ckpt, tmp_path, capsys):
    # Table 4's "optimal setting": every (t, clean or noisy input) at the probe depth, the
    # headline chosen by held-out top-1 (a part of TRAIN), never by val.
    res = probe(ckpt, tmp_path, "--select-setting", "--grid-ts", "0,40", "--wd-grid", "1e-3")
    assert {(r["depth"], r["t"], r["noisy"]) for r in res["grid"]} == {
        (2, 0, False), (2, 0, True), (2, 40, False), (2, 40, True)}
    best = max(res["grid"], key=lambda r: r["heldout_top1"])
    assert (res["t"], res["noisy_input"]) == (best["t"], best["noisy"])
    assert "40n" in capsys.readouterr().out                              # the table's noisy column


def test_table4_setting_is_chosen_on_a_train_subset_then_the_mae_protocol_runs_at_it(
        ckpt, tmp_path, monkeypatch):
    # --select-setting --protocol mae: every (t, clean or noisy input) by the cached head on a
    # seeded subset of train (not a full feature set per setting), then MAE's protocol at the
    # chosen setting alone; both are reported, and val never takes part in the choice
    passes, real = [], features.extract

    def counted(featurize, ds, *args, **kwargs):
        out = real(featurize, ds, *args, **kwargs)
        passes.append((len(ds), sorted(out[0])))
        return out
    monkeypatch.setattr(features, "extract", counted)
    flags = ["--protocol", "mae", "--select-setting", "--grid-ts", "0,40", "--select-images",
             "50", "--wd-grid", "1e-3"]
    res = probe(ckpt, tmp_path / "a", *flags)
    chosen = res["setting_selection"]
    assert chosen["images"] == 50 and sorted(chosen["heldout_top1"]) == [
        "t0", "t0_noisy", "t40", "t40_noisy"]
    best = max(chosen["heldout_top1"], key=chosen["heldout_top1"].get)
    assert best == f"t{res['t']}{'_noisy' if res['noisy_input'] else ''}"
    assert (res["t"], res["noisy_input"]) == (chosen["chosen"]["t"], chosen["chosen"]["noisy"])
    assert res["protocol"] == "mae" and res["protocol_vs_paper"].startswith("the paper's")
    assert passes[0][0] == 50 and len(passes[0][1]) == 4          # the sweep: 50 images
    assert all(len(keys) == 1 for _, keys in passes[1:])          # mae: the chosen setting
    again = probe(ckpt, tmp_path / "b", *flags, "--synthetic-val-size", "30")
    assert again["setting_selection"] == chosen                    # val decided nothing


def test_single_level_checkpoint_is_probed_at_its_own_level(tmp_path):
    ck = pretrain_ckpt(tmp_path / "single", "--noise", "single")
    res = probe(ck, tmp_path / "probe", "--protocol", "cached", "--wd-grid", "1e-3")
    assert (res["t"], res["noisy_input"]) == (408, False)
    res = probe(ck, tmp_path / "probe10", "--protocol", "cached", "--wd-grid", "1e-3",
                "--probe-t", "10")
    assert res["t"] == 10


def test_mae_accumulation_averages_over_the_micro_batches_that_exist(ckpt, tmp_path, monkeypatch):
    # 120 images, global batch 16384 in micro-batches of 64: one step of 2 micro-batches per
    # epoch; each loss must be divided by 2 (the mean), not by the nominal 256.
    divisors = []
    orig = torch.Tensor.__truediv__

    def spy(self, other):
        if isinstance(other, int) and self.requires_grad and self.ndim == 0:
            divisors.append(other)
        return orig(self, other)
    monkeypatch.setattr(torch.Tensor, "__truediv__", spy)
    res = linprobe.main(probe_args(ckpt, "--protocol", "mae", "--synthetic-size", "120",
                                   "--synthetic-val-size", "60", "--epochs", "1",
                                   "--warmup-epochs", "0",
                                   "--max-device-batch", "64", "--num-workers", "0",
                                   "--output-dir", str(tmp_path)))
    assert res["accum_iter"] == 2 and divisors == [2, 2]


@pytest.mark.xdist_group("quickstart")   # one worker trains the quick start
def test_default_vit_tiny_learns_more_than_a_random_network(quickstart_checkpoint, tmp_path):
    # `python pretrain.py --model vit_tiny` with no other flag (conftest.py; docs/RESULTS.md,
    # Reproduction), then `--compare` on 2000 val images: learned > random init > raw pixels on
    # the synthetic set. Fails if the objective, the latent normalisation, the defaults or the
    # probe stop learning anything a random network lacks. Measured: 25.1 learned vs 18.65
    # random init vs 11.35 pixels; the registry's old d = 4 at pixel scale gave 17.4 vs 18.1.
    res = linprobe.main(probe_args(quickstart_checkpoint, "--protocol", "cached", "--compare",
                                   "--synthetic-val-size", "2000", "--num-workers", "0",
                                   "--output-dir", str(tmp_path / "probe")))
    assert res["top1"] > res["random_init_top1"] > res["pixels_top1"], res


def test_random_init_has_active_blocks_not_pooled_embeddings(ckpt):
    args = probe_args(ckpt, "--random-init")
    model = features.load_backbone(args, torch.device("cpu"))
    shapes = synthetic.SyntheticShapes(4, 32, transform=transforms.build_transform("center", 32))
    x = torch.stack([shapes[i][0] for i in range(4)])
    with torch.no_grad():
        xp = model.add_noise(x, torch.zeros(4, dtype=torch.long))  # the clean input it probes
        pooled = (model.x_embedder(xp) + model.pos_embed).mean(1)  # (B, D) what zero gates give
        feats = model.forward_features(x)
        assert (feats - pooled).abs().max() > 0.1 * pooled.abs().max()
        model.init_weights(active=False)                           # DiT init: blocks are identity
        xp_pooled = (model.x_embedder(xp) + model.pos_embed).mean(1)
        assert torch.allclose(model.forward_features(x), xp_pooled, atol=1e-5)


def write_colour_folder(root, jitter, n_train=60, n_val=40, size=32):
    """Three classes (reddish / greenish / bluish flat images + pixel noise) in root/{train,val}.
    jitter: per-image colour noise; small -> linearly separable, 0.2 -> classes overlap."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(("red", "green", "blue")):
            os.makedirs(root / split / name)
            for i in range(n):
                colour = 0.35 + jitter * torch.randn(3, 1, 1, generator=g)
                colour[c] += 0.3
                img = (colour + 0.1 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
                pixels = (img.permute(1, 2, 0).numpy() * 255).astype("uint8")
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


def test_pixel_baseline_separates_a_separable_toy_set(tmp_path):
    root = write_colour_folder(tmp_path / "colours", jitter=0.03)
    res = probe(None, tmp_path / "out", "--baseline", "pixels", "--dataset", "imagefolder",
                "--data-path", root, "--input-size", "32", "--protocol", "cached")
    assert res["features"].startswith("raw pixels") and res["top1"] == 100 and res["n_val"] == 120


def test_every_bad_input_has_its_message(ckpt, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        probe(str(tmp_path / "nope.pt"), tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt is not a.*checkpoint"):
        probe(str(tmp_path / "other.pt"), tmp_path)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="text.pt"):
        probe(str(tmp_path / "text.pt"), tmp_path)
    with pytest.raises(UserError, match="takes 32x32 images.*--input-size 64"):
        probe(ckpt, tmp_path, "--input-size", "64")
    with pytest.raises(UserError, match="class counts do not fit: train has 10.*--nb-classes 5"):
        probe(ckpt, tmp_path, "--nb-classes", "5")
    with pytest.raises(UserError, match="probe depths must be in 1..4"):
        probe(ckpt, tmp_path, "--probe-depth", "7")
    for flags, msg in [(("--grid", "--protocol", "mae"), "--grid needs --protocol cached"),
                       (("--select-setting", "--protocol", "knn"),
                        "--select-setting cached or mae"),
                       (("--baseline", "pixels", "--random-init"),
                        "--baseline pixels has no network"),
                       (("--warmup-epochs", "9"), "--warmup-epochs must be in")]:
        with pytest.raises(UserError, match=msg):
            probe(ckpt, tmp_path, *flags)
    with pytest.raises(UserError, match="give the checkpoint"):
        probe(None, tmp_path)
    with pytest.raises(SystemExit):             # a bad number stops at parse time, exit 2
        probe(ckpt, tmp_path, "--views", "0", "--protocol", "cached")


def test_cli_error_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "linprobe.py"),
                        str(tmp_path / "missing.pt")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint")
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []          # the default out/probe it made is gone again


def test_torchrun_two_processes_gather_the_same_features(ckpt, tmp_path):
    # cached under DDP: each rank encodes items r, r+2, ... (101 train images: unequal shards); the
    # gathered, re-interleaved features must give exactly the single-process result.
    flags = ["--protocol", "cached", "--solver", "lars", "--lr-grid", "1", "--lr", "100",
             "--synthetic-size", "101", "--synthetic-val-size", "51", "--epochs", "3",
             "--warmup-epochs", "1", "--batch-size", "32", "--num-workers", "0"]
    one = probe_args(ckpt, *flags, "--output-dir", str(tmp_path / "one"))
    single = linprobe.main(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join(ROOT, "linprobe.py"), ckpt, *flags,
                        "--output-dir", str(tmp_path / "two")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = json.loads(r.stdout.strip().splitlines()[-1])
    assert ddp["top1"] == single["top1"] and ddp["heldout_top1"] == single["heldout_top1"]
    assert ddp["n_train"] == 101
    one = torch.load(tmp_path / "one" / "head.pt", weights_only=True)["heads"]["depth2_t10"]
    two = torch.load(tmp_path / "two" / "head.pt", weights_only=True)["heads"]["depth2_t10"]
    # same features paired with the same labels in the same order -> the same trained head
    assert torch.allclose(one["head"]["1.weight"], two["head"]["1.weight"], atol=1e-4)


def test_gathered_shards_come_back_in_dataset_order(monkeypatch):
    # extract() in a simulated 2-rank world: rank r encodes items r, r+2, ... (7 items: unequal
    # shards); all_gather is replayed from what each rank sent. Labels = item indices = features.
    ds = [(torch.full((3,), float(i)), i) for i in range(7)]
    args = probe_args("--max-device-batch", "2", "--num-workers", "0")
    featurize = lambda x: {"k": x}  # noqa: E731
    sent = {}
    for rank in (0, 1):
        sent[rank] = []
        def record(parts, pad):
            sent[rank].append(pad.clone())
        monkeypatch.setattr(features.dist, "all_gather", record)
        features.extract(featurize, ds, args, torch.device("cpu"), rank, 2, "x")
    calls = iter(range(2))                                  # features, then labels

    def replay(parts, pad):
        i = next(calls)
        for r in (0, 1):
            parts[r].copy_(sent[r][i])
    monkeypatch.setattr(features.dist, "all_gather", replay)
    feats, labels = features.extract(featurize, ds, args, torch.device("cpu"), 0, 2, "x")
    assert labels.tolist() == list(range(7)) and torch.equal(feats["k"][:, 0], torch.arange(7.0))


def test_compare_prints_learned_random_init_and_pixels_in_one_table(ckpt, tmp_path, capsys,
                                                                    monkeypatch):
    """One command gives the learned features and both baselines, same probe and data, each
    with its linear and its k-NN figure from ONE feature pass (train + val) per row."""
    passes = []
    orig = features.extract

    def counted(featurize, ds, *args):
        passes.append(len(ds))
        return orig(featurize, ds, *args)
    monkeypatch.setattr(features, "extract", counted)
    res = probe(ckpt, tmp_path, "--protocol", "cached", "--compare")
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(res))
    table = "\n".join(out[-5:-1])
    assert "random-init vit_tiny" in table and "raw pixels" in table
    assert "vit_tiny checkpoint (raw weights)" in table
    assert "linear top-1" in out[-5] and "k-NN top-1" in out[-5]
    for line, name in zip(out[-4:-1], ("", "random_init_", "pixels_")):
        figures = [float(v) for v in line.split()[-4:]]             # linear top-1, top-5, k-NN
        assert figures == [res[name + f] for f in ("top1", "top5", "knn_top1", "knn_top5")]
    for name in ("learned", "random_init", "pixels"):
        assert (tmp_path / name / "head.pt").exists()
    assert {"top1", "random_init_top1", "pixels_top1"} <= set(res)
    assert {"knn_top1", "random_init_knn_top1", "pixels_knn_top1", "pixels_knn_top5"} <= set(res)
    assert passes == [120, 60] * 3                  # the k-NN reused the linear head's features
    # the k-NN column is the k-NN protocol's figure on the same features
    alone = probe(ckpt, tmp_path / "knn", "--protocol", "knn")
    assert (alone["top1"], alone["top5"]) == (res["knn_top1"], res["knn_top5"])
    assert alone["protocol"] == "knn" and not (tmp_path / "knn" / "head.pt").exists()
    with pytest.raises(UserError, match="--compare"):
        probe(ckpt, tmp_path, "--protocol", "cached", "--compare", "--random-init")


# ---------------------------------------------------------------------------------------------
# Weighted k-NN
# ---------------------------------------------------------------------------------------------
def knn_reference(train_x, train_y, val_x, num_classes, k, temperature):
    """DINO's weighted k-NN written out in float64, one val image at a time: cosine similarity
    to every train image, a stable sort (a tie goes to the earlier train image), the first k
    vote for their label with weight exp(sim / T)."""
    scores = torch.zeros(len(val_x), num_classes, dtype=torch.float64)
    for i, query in enumerate(val_x.double()):
        sims = [float(query @ x / (query.norm() * x.norm())) for x in train_x.double()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])     # sorted() is stable
        for j in order[:k]:
            scores[i, int(train_y[j])] += math.exp(sims[j] / temperature)
    return scores


def test_knn_equals_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    val_x = torch.randn(13, 6, generator=g)
    for k, temperature, chunk in [(5, 0.07, 4), (1, 0.07, None), (40, 0.5, 3), (7, 2.0, 13)]:
        got = knn.knn_scores(train_x, train_y, val_x, 3, k, temperature, "cpu", chunk)
        want = knn_reference(train_x, train_y, val_x, 3, k, temperature)
        assert torch.allclose(got.double(), want, rtol=1e-4), (k, temperature, chunk)
    # the temperature decides: one near neighbour of class 0 against two farther ones of class 1
    train_x = torch.tensor([[1.0, 0.15, 0], [1.0, 0.5, 0], [1.0, -0.5, 0], [0, 0, 1.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    val_x = torch.tensor([[1.0, 0, 0]])
    sharp = knn.knn_scores(train_x, train_y, val_x, 3, 3, 0.07, "cpu")
    flat = knn.knn_scores(train_x, train_y, val_x, 3, 3, 1.0, "cpu")
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1
    assert torch.allclose(sharp.double(), knn_reference(train_x, train_y, val_x, 3, 3, 0.07))


def test_knn_ties_at_the_kth_neighbour_go_to_the_earlier_train_image():
    # topk alone picks among equal values in its own order (on this row it returns 5 before 0)
    sim = torch.tensor([[0.5, 0.75, 0.5, 0.5, 0.125, 0.5]])
    values, indices = knn.nearest(sim, 3)
    assert indices.tolist() == [[1, 0, 2]] and values.tolist() == [[0.75, 0.5, 0.5]]
    assert knn.nearest(sim, 6)[1].tolist() == [[1, 0, 2, 3, 5, 4]]          # k = N
    # four identical train images (exactly equal cosines) around the k-th place, labels 1 1 2 2
    same = [0.6, 0.8, 0.0]
    train_x = torch.tensor([same, [1.0, 0, 0], same, same, [0, 0, 1.0], same])
    train_y = torch.tensor([1, 0, 1, 2, 0, 2])
    val_x = torch.tensor([[1.0, 0, 0], [2.0, 0, 0]])
    got = knn.knn_scores(train_x, train_y, val_x, 3, 3, 0.07, "cpu", chunk=1)
    want = knn_reference(train_x, train_y, val_x, 3, 3, 0.07)
    assert torch.allclose(got.double(), want) and got[:, 2].abs().max() == 0
    # equal class scores rank the lower class first (an unstable sort puts class 8 first here)
    assert knn.top1_top5(torch.zeros(2, 17), torch.tensor([0, 5])) == [50, 50]


def test_knn_separates_separable_classes_and_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:4] * 4                                  # 4 classes, apart by angle
    train_y, val_y = torch.arange(800) % 4, torch.arange(400) % 4
    train_x = centres[train_y] + torch.randn(800, 16, generator=g)
    val_x = centres[val_y] + torch.randn(400, 16, generator=g)
    args = probe_args()                                              # k 20, T 0.07
    assert args.knn_k == 20 and args.knn_t == 0.07
    res = knn.probe_knn(train_x, train_y, val_x, val_y, args, 4, "cpu")
    assert res["knn_top1"] > 99 and res["knn_top5"] == 100
    shuffled = train_y[torch.randperm(800, generator=g)]             # labels that mean nothing
    res = knn.probe_knn(train_x, shuffled, val_x, val_y, args, 4, "cpu")
    assert 15 < res["knn_top1"] < 35                                 # chance: 25
    with pytest.raises(ValueError, match="k = 801"):
        knn.knn_scores(train_x, train_y, val_x, 4, 801, 0.07, "cpu")


# ---------------------------------------------------------------------------------------------
# --protocol auto, the settings block, --help
# ---------------------------------------------------------------------------------------------
def test_auto_protocol_rule():
    def chosen(n_train, *flags):
        return linprobe.choose_protocol(probe_args(*flags), n_train)[0]
    assert linprobe.AUTO_MIN_STEPS == 20
    assert chosen(2000) == "cached" and chosen(20 * 16384 - 1) == "cached"
    assert chosen(20 * 16384) == "mae" and chosen(1_281_167) == "mae"              # ImageNet
    assert chosen(60000) == "cached" and chosen(60000, "--batch-size", "256") == "mae"
    assert chosen(10**7, "--grid") == "cached" and chosen(10**7, "--views", "2") == "cached"
    assert chosen(10, "--protocol", "mae") == "mae" and chosen(10**7, "--protocol", "knn") == "knn"


def test_auto_picks_cached_on_a_small_set_and_mae_on_a_big_enough_one(ckpt, tmp_path, capsys):
    res = probe(ckpt, tmp_path / "small")                  # 120 images at batch 32: 3 steps
    assert res["protocol"] == "cached" and res["protocol_reason"].startswith("auto: 120 train")
    assert "not the paper's" in res["protocol_vs_paper"]
    out = capsys.readouterr().out
    block = out[out.index("[linprobe] effective settings"):].splitlines()[1:9]
    assert [line.split()[0] for line in block] == [
        "checkpoint", "model", "probe", "data", "protocol", "not", "head", "output"]
    assert "120 train / 60 val images" in out and "cached (auto: 120 train images" in out
    assert f"output      {tmp_path / 'small'}" in out
    res = probe(ckpt, tmp_path / "big", "--batch-size", "6", "--epochs", "1",
                "--warmup-epochs", "0")                    # 120 / 6 = 20 steps per epoch
    assert res["protocol"] == "mae" and res["protocol_vs_paper"].startswith("the paper's")
    out = capsys.readouterr().out
    assert "global batch 6 = 1 rank(s) x accum 1 x micro-batch 6, 20 step(s)" in out
    assert "base 0.1, actual 0.002344 (--blr 0.1 x batch 6 / 256)" in out
    assert "1 epochs, 0 warmup" in out


def test_help_shows_every_flag_with_help_default_and_group():
    parser = linprobe.get_args_parser()
    titles = [group.title for group in parser._action_groups if group._group_actions]
    assert titles[-4:] == ["what to probe", "protocol and head", "data", "device and output"]
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), action.dest
        flag = (action.option_strings or [action.dest])[-1]
        assert flag in text
    assert text.count("(default:") >= len(parser._actions) - 1
    assert "{auto,mae,cached,knn}" in text and "(default: auto)" in text
    assert "--knn-k KNN_K" in text and "(default: 20)" in text and "(default: 0.07)" in text
