"""pretrain.py on tiny CPU configs: model registry and sizes, schedule, overfitting, DDP == one
process, exact resume, checkpoint files, divergence handling and user errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ldae
import pack_data
import pretrain
from util import decode, lr_sched, registry, synthetic, transforms
from util.cli import UserError
from util.engine import Diverged, Engine
from conftest import tiny_flags
from tokenizer_pca import fit_pca

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(n):
    return synthetic.SyntheticShapes(n, 32, transform=transforms.build_transform("center", 32))


def argv_of(out, pca, *extra):
    """conftest's tiny run (vit_tiny, 48 synthetic images, global batch 8 -> 6 steps/epoch; its
    session pca_file) at 2 epochs, logging every step and a grid every epoch."""
    return tiny_flags(out, pca, "--epochs", "2", "--log-every", "1", "--grid-every", "1", *extra)


def run(out, pca, *extra):
    return pretrain.main(pretrain.get_args_parser().parse_args(argv_of(out, pca, *extra)))


def logged(out, kind="log"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_registry_dispatch_and_vit_b_size():
    with torch.device("meta"):
        m = registry.build_model("vit_b", img_size=None)
        dit = registry.build_model("dit_tiny_1", schedule="ddpm")
    # a flag of the other family is refused, not silently dropped
    with pytest.raises(UserError, match="--schedule: not a flag of --model vit_b"):
        registry.build_model("vit_b", schedule="ddpm")
    with pytest.raises(UserError, match="--residual-weight: not a flag of --model dit_tiny_1"):
        registry.build_model("dit_tiny_1", residual_weight=0.1)
    assert m.config["family"] == "ldae"
    assert dit.config["family"] == "dit"
    assert dit.config["schedule"] == "ddpm"
    # RECIPE s4: the encoder (x_embedder + first 12 blocks) without its t-conditioning is a ViT-B
    enc = sum(p.numel() for k, p in m.named_parameters() if k.startswith("x_embedder") or (
        k.startswith("blocks.") and int(k.split(".")[1]) < 12 and "adaLN" not in k))
    assert 85e6 < enc < 87e6
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tiny = registry.build_model("vit_tiny", latent_dim=8)
    assert tiny.config["latent_dim"] == 8 and tiny.forward_features(x).shape == (2, 64)
    assert tiny(x, torch.zeros(2, dtype=torch.long)).shape == (2, 64, 48)      # (B, L, p*p*3)
    with pytest.raises(UserError, match="unknown --model 'vit_q'.*vit_tiny"):
        registry.build_model("vit_q")


def test_lr_schedule_is_warmup_then_half_cosine():
    f = lambda s: lr_sched.lr_at(s, 10, 1e-3, warmup_epochs=2, epochs=10)  # noqa: E731
    assert f(0) == 0 and f(10) == pytest.approx(5e-4) and f(20) == pytest.approx(1e-3)
    assert f(60) == pytest.approx(5e-4) and f(100) == pytest.approx(0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(20, 100))


def test_perfect_prediction_is_zero_loss_and_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = registry.build_model("vit_tiny", fit_pca(shapes(16), 4, progress=False, device="cpu"))
    x = torch.stack([shapes(8)[i][0] for i in range(8)])
    orig = model.forward
    model.forward = lambda xt, t: model.pca.patchify(x)                     # a perfect prediction
    assert model.loss(x).item() == pytest.approx(0, abs=1e-8)
    model.forward = orig

    def fixed_noise_loss():
        torch.manual_seed(123)
        return model.loss(x).item()

    args = pretrain.get_args_parser().parse_args(["--model", "vit_tiny", "--ema", "0"])
    engine = Engine(model, args, 0, 1, torch.device("cpu"))
    before = fixed_noise_loss()
    for s in range(20):
        engine.step([(x, torch.zeros(8, dtype=torch.long))], s, 3e-3)
    assert fixed_noise_loss() < 0.5 * before


def test_run_writes_checkpoint_log_grid_and_final_json(tmp_path, pca_file, capsys):
    res = run(tmp_path, pca_file, "--max-steps", "7")                       # crosses the epoch at 6
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res and res["steps"] == 7 and math.isfinite(res["final_loss"])
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)          # plain dict, no pickles
    assert ck["step"] == 7
    assert ck["epoch"] == 1
    assert ck["version"] == 1
    assert ck["args"]["batch_size"] == 8
    assert torch.load(tmp_path / "checkpoint-0001.pt", weights_only=True)["step"] == 6
    assert [r["step"] for r in logged(tmp_path)] == list(range(1, 8))
    assert [r["step"] for r in logged(tmp_path, "epoch")] == [6]
    from PIL import Image
    # 8 columns, 11 rows of 96 px
    w, h = Image.open(res["grid"]).size
    assert (w, h) == (8 * 96 + 9 * 2, 11 * 96 + 12 * 2)
    # linprobe's entry points: the same model back, raw or EMA weights, strictly
    reloaded = registry.load(str(tmp_path / "checkpoint.pt"))
    model = registry.model_from_checkpoint(reloaded, "raw")
    weights = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(v, ck["model"][k]) for k, v in weights.items())
    ema = registry.model_from_checkpoint(ck, "ema")
    assert not torch.equal(ema.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    ck["model"]["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(UserError, match="unexpected keys.*blocks.0.extra"):
        registry.model_from_checkpoint(ck, "raw")


def test_resume_is_bit_identical_mid_epoch_and_across_workers(tmp_path, pca_file):
    # random crops + a data-loader worker in one run and none in the other: augmentation, data
    # order and noise must all be pure functions of (seed, epoch, step), not of process history
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, pca_file, "--max-steps", "7", "--aug", "rrc")
    # stops mid-epoch
    run(split, pca_file, "--max-steps", "3", "--aug", "rrc", "--num-workers", "1")
    run(split, pca_file, "--max-steps", "7", "--aug", "rrc", "--resume", "auto")
    assert [r["loss"] for r in logged(straight)] == [r["loss"] for r in logged(split)]
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        names = [k for k in a[key] if isinstance(a[key][k], torch.Tensor)]
        assert all(torch.equal(a[key][k], b[key][k]) for k in names)
    state_a, state_b = a["optimizer"]["state"][0], b["optimizer"]["state"][0]
    assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


def test_decode_gpu_decodes_batches_on_the_device_cpu_here(tmp_path, monkeypatch):
    # --decode gpu: workers ship JPEG bytes, Engine.step decodes them with decode.decode_batch on
    # the training device (CPU here: the same code path as CUDA, only decode_jpeg's device differs)
    # flat root: 30 train images
    jpegs = pack_data.write_jpeg_folder(tmp_path / "jpegs", 40, size=(48, 36))
    calls, real = [], decode.decode_batch

    def counting_decode_batch(batch, *args, **kwargs):
        calls.append(len(batch))
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(decode, "decode_batch", counting_decode_batch)
    argv = ["--model", "vit_tiny", "--dataset", "imagefolder", "--data-path", str(jpegs),
            "--aug", "rrc", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0.5",
            "--lr", "1e-3", "--num-workers", "1", "--pca-images", "16", "--log-every", "1",
            "--output-dir", str(tmp_path / "out")]
    gpu_argv = argv + ["--decode", "gpu", "--max-steps", "2"]
    res = pretrain.main(pretrain.get_args_parser().parse_args(gpu_argv))
    assert res["steps"] == 2
    assert math.isfinite(res["final_loss"])
    assert len(logged(tmp_path / "out")) == 2
    ck = registry.load(res["checkpoint"])
    assert ck["step"] == 2 and ck["args"]["decode"] == "gpu"
    assert calls == [8, 8, 8]                    # the grid's 8 images, then one batch of 8 per step
    resume_argv = argv + ["--max-steps", "3", "--resume", "auto"]
    with pytest.raises(UserError, match="trained with --decode gpu, this run asks for pil"):
        pretrain.main(pretrain.get_args_parser().parse_args(resume_argv))


def test_two_processes_under_torchrun_match_one_process(tmp_path, pca_file):
    # the noise of micro-batch k of step s is seeded by (seed, s, k): 2 ranks x accum 1 must see the
    # same examples and noise as 1 process x accum 2 with the same global batch
    run(tmp_path / "one", pca_file, "--max-steps", "3", "--accum-iter", "2")   # in this process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two_argv = [*torchrun, "pretrain.py", *argv_of(tmp_path / "two", pca_file, "--max-steps", "3")]
    two = subprocess.run(two_argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout.strip().splitlines()[-1])["steps"] == 3
    l1 = [r["loss"] for r in logged(tmp_path / "one")]
    l2 = [r["loss"] for r in logged(tmp_path / "two")]
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)


def test_killed_save_leaves_last_checkpoint_loadable(tmp_path, pca_file, monkeypatch):
    run(tmp_path, pca_file, "--max-steps", "2")
    real_save = torch.save

    def dying_save(obj, path, *a, **k):         # writes half a file, then the process "dies"
        with open(path, "wb") as f:
            f.write(b"garbage")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, pca_file, "--max-steps", "4", "--resume", "auto")
    monkeypatch.setattr(torch, "save", real_save)
    assert registry.load(str(tmp_path / "checkpoint.pt"))["step"] == 2
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(
        tmp_path, pca_file, monkeypatch):
    calls, real_loss = [0], ldae.LDAE.loss

    def loss_goes_nan(self, x, labels=None):
        calls[0] += 1
        out = real_loss(self, x, labels)
        return out * float("nan") if calls[0] > 4 else out      # steps 1..4 fine, NaN from step 5

    monkeypatch.setattr(ldae.LDAE, "loss", loss_goes_nan)
    message = r"non-finite loss at step 5 \(lr .*grad norm nan\).*step 3\) is untouched"
    with pytest.raises(Diverged, match=message):
        # 3 steps/epoch: saved at 3
        run(tmp_path, pca_file, "--log-every", "2", "--synthetic-size", "24")
    assert registry.load(str(tmp_path / "checkpoint.pt"))["step"] == 3
    assert not os.path.exists(tmp_path / "checkpoint-0002.pt")


def test_preset_sets_defaults_and_explicit_flags_win():
    argv = ["--preset", "t3_ldae", "--model", "vit_tiny", "--epochs", "3"]
    args = pretrain.get_args_parser().parse_args(argv)
    got = (args.model, args.epochs, args.latent_dim, args.residual_weight)
    assert got == ("vit_tiny", 3, 32, 0.1)


def test_benchmark_prints_speed_and_flops(capsys):
    import bench_train
    res = bench_train.main(bench_train.get_args_parser().parse_args(
        ["--model", "vit_tiny", "--steps", "2", "--batch-size", "4", "--ema", "0"]))
    assert res["img_per_s"] > 0 and res["mfu"] is None and res["train_gflops_per_img"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "benchmark"


@pytest.mark.parametrize("extra, msg", [
    (["--model", "vit_q"], "unknown --model 'vit_q'; choose from .*vit_b"),
    (["--accum-iter", "3"], r"--batch-size 8 \(the global batch\) must be a positive multiple"),
    (["--pca", "/nonexistent/pca.pt"], "--pca file /nonexistent/pca.pt does not exist"),
    (["--resume", "/nonexistent/ck.pt"], "checkpoint /nonexistent/ck.pt does not exist"),
    (["--patch-size", "8"], "has 4px x 3ch patches but --model vit_tiny uses 8px"),
    (["--model", "dit_tiny_1", "--dit-input", "latents", "--decode", "gpu"],
     "--pca, --decode would be ignored on --latents-file"),
])
def test_bad_flags_and_paths(tmp_path, pca_file, extra, msg):
    with pytest.raises(UserError, match=msg):
        run(tmp_path, pca_file, *extra)


def test_unwritable_output_and_exit_code_2(tmp_path, pca_file):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="not writable"):
        run(tmp_path / "a_file" / "out", pca_file)
    argv = [sys.executable, "pretrain.py", "--model", "vit_q"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: unknown --model 'vit_q'")
    assert "Traceback" not in p.stderr


def test_a_batch_larger_than_the_data_is_capped_with_a_note(tmp_path, pca_file, capsys):
    res = run(tmp_path, pca_file, "--batch-size", "60", "--accum-iter", "5", "--max-steps", "1")
    note = "--batch-size 60 exceeds the training set (48 images); using a global batch of 45"
    assert note in capsys.readouterr().out
    assert res["steps"] == 1
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["args"]["batch_size"] == 45


def test_a_warmup_as_long_as_the_run_is_announced(tmp_path, pca_file, capsys):
    run(tmp_path, pca_file, "--warmup-epochs", "2", "--max-steps", "1")
    out = capsys.readouterr().out
    assert "warning: the warmup (12 steps) is as long as the run (1 steps)" in out
    assert "peaks at 0, not 0.001" in out
    run(tmp_path / "ok", pca_file, "--max-steps", "1", "--warmup-epochs", "0")
    assert "warning" not in capsys.readouterr().out


def test_small_models_get_training_defaults_that_fit_small_data():
    parse = pretrain.get_args_parser().parse_args
    tiny = parse(["--model", "vit_tiny"])
    lr = lr_sched.scaled_lr
    assert (tiny.batch_size, lr(tiny), tiny.warmup_epochs < tiny.epochs) == (64, 4e-3, True)
    assert lr(parse(["--model", "vit_tiny", "--lr", "1e-3"])) == 1e-3         # explicit flags win
    assert lr(parse(["--model", "vit_tiny", "--blr", "0.004"])) == 1e-3       # --blr too
    assert lr(parse(["--model", "vit_tiny", "--batch-size", "128"])) == 8e-3  # the scaling rule
    big = parse(["--model", "vit_b"])
    assert (big.batch_size, big.lr, big.epochs) == (2048, None, 400)          # the paper's
    row = parse(["--preset", "t3_ldae", "--model", "vit_tiny"])   # a small row: small batch
    assert (row.batch_size, row.residual_weight) == (64, 0.1)
