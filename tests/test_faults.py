"""Fault injection: nothing is lost and every bad input is one clear line. Kills at random points
(mid-step and mid-save) followed by --resume auto end bitwise equal to an uninterrupted run;
SIGTERM / Ctrl-C save and resume; a full disk is said plainly; a finished run is never replaced
silently; --resume refuses changes that would alter the run; torchrun's elastic restart and a
two-node rendezvous train the same numbers as one process (docs/USAGE.md, "Faults we test")."""
import errno
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import zlib

import pytest
import torch

import linprobe
import pack_data
import pretrain
import tokenizer_pca
from util import cli, datasets, decode, files, registry, transforms
from util.cli import UserError
from conftest import tiny_flags, tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "fault_driver.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


flags = tiny_flags
run = tiny_run


def driver(out, pca, fault=None, *extra, launcher=()):
    env = {**ENV, "FAULT": fault or ""}
    cmd = [*launcher, DRIVER, *flags(out, pca, *extra)]
    if not launcher:
        cmd = [sys.executable, *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def tensors(path):
    ck = torch.load(path, weights_only=True)
    flat = {f"model.{k}": v for k, v in ck["model"].items() if torch.is_tensor(v)}
    flat.update({f"ema.{k}": v for k, v in (ck["ema"] or {}).items() if torch.is_tensor(v)})
    for i, state in ck["optimizer"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return ck["step"], flat


def assert_same_run(a, b, name="checkpoint.pt"):
    step_a, ta = tensors(os.path.join(a, name))
    step_b, tb = tensors(os.path.join(b, name))
    assert step_a == step_b and ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_log_reads_as_one_run(out):
    recs = [r for r in records(out) if r["kind"] in ("log", "epoch")]
    for kind in ("log", "epoch"):
        steps = [r["step"] for r in recs if r["kind"] == kind]
        assert steps == sorted(set(steps)), (kind, steps)       # no duplicates, never backwards


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pca_file):
    """One uninterrupted run (in a subprocess, as the faulted runs are)."""
    out = tmp_path_factory.mktemp("reference")
    p = driver(out, pca_file)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.xdist_group("faults_reference")   # one worker runs the reference
def test_kill_loop_at_random_points_resumes_bitwise(tmp_path, pca_file, reference):
    # SIGKILLs in the first write of the first epoch end (the epoch copy, before checkpoint.pt
    # links to it), then after a random step and in the middle of a random checkpoint write, each
    # followed by --resume auto: the final model, EMA and optimizer equal the uninterrupted run's
    # bit for bit, every kept epoch file exists and equals the reference's, no temporary file is
    # left behind
    rng = random.Random(0)
    faults = ["kill-save:1", f"kill-step:{rng.randint(1, 5)}", f"kill-save:{rng.randint(1, 3)}"]
    for fault in faults:
        p = driver(tmp_path, pca_file, fault, "--resume", "auto")
        assert p.returncode == -signal.SIGKILL, (fault, p.returncode, p.stderr[-1500:])
        if fault == "kill-save:1":
            assert not os.path.exists(tmp_path / "checkpoint.pt")
            assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the half file
    p = driver(tmp_path, pca_file, None, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_run(reference, tmp_path)
    for epoch in (1, 2, 3):
        assert_same_run(reference, tmp_path, f"checkpoint-{epoch:04d}.pt")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert_log_reads_as_one_run(tmp_path)
    assert sum(r["kind"] == "resume" for r in records(tmp_path)) >= 1


@pytest.mark.xdist_group("faults_reference")   # one worker runs the reference
def test_sigterm_and_ctrl_c_finish_the_step_save_and_resume_bitwise(tmp_path, pca_file, reference):
    # SIGTERM at step 4, then Ctrl-C 3 steps into the resumed run (step 7): each stop saves the
    # step it was on (mid-epoch), and the run resumed once more ends equal to the reference
    stops = (("term-step:4", signal.SIGTERM, 4), ("int-step:3", signal.SIGINT, 7))
    for fault, signum, step in stops:
        p = driver(tmp_path, pca_file, fault, "--resume", "auto")
        assert p.returncode == 128 + signum, p.stderr[-1500:]
        assert "Traceback" not in p.stderr
        name = signal.Signals(signum).name
        assert f"stopped by {name} at step" in p.stderr and "--resume auto" in p.stderr
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == step
        assert records(tmp_path)[-1]["kind"] == "stopped"
    p = driver(tmp_path, pca_file, None, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_run(reference, tmp_path)
    assert_log_reads_as_one_run(tmp_path)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, pca_file):
    out = tmp_path_factory.mktemp("ddp_reference")
    p = driver(out, pca_file, launcher=torchrun("--standalone", "--nproc_per_node=2"))
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.xdist_group("faults_ddp")   # one worker runs the 2-rank reference
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(
        tmp_path, pca_file, ddp_reference):
    # only rank 0 gets the signal: the ranks agree through the all-reduced flag, both stop, save
    # once, and a resumed 2-rank run ends equal to the uninterrupted one
    two = torchrun("--standalone", "--nproc_per_node=2")
    p = driver(tmp_path, pca_file, "term-step:3", launcher=two)
    assert p.returncode != 0 and "stopped by SIGTERM" in p.stderr, p.stderr[-2000:]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] in (3, 4)
    p = driver(tmp_path, pca_file, None, "--resume", "auto", launcher=two)
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_run(ddp_reference, tmp_path)


@pytest.mark.xdist_group("faults_ddp")   # one worker runs the 2-rank reference
def test_elastic_restart_resumes_by_itself_and_ends_equal(tmp_path, pca_file, ddp_reference):
    # torchrun --max-restarts 1: rank 1 is SIGKILLed after step 8 (epoch 1 is saved); the agent
    # restarts both workers, which resume from checkpoint.pt without being told to
    launcher = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1")
    p = driver(tmp_path, pca_file, "kill-rank1:8", launcher=launcher)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torchrun restart 1: resuming from" in p.stdout
    assert_same_run(ddp_reference, tmp_path)
    assert_log_reads_as_one_run(tmp_path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("faults_ddp")   # one worker runs the 2-rank reference
def test_two_nodes_over_c10d_rendezvous_equal_one_node(tmp_path, pca_file, ddp_reference):
    # two launchers on this machine, one process each, meet at a c10d rendezvous (gloo): the same
    # losses as two processes on one node (which test_pretrain.py shows equal one process)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        torchrun("--nnodes=2", f"--node-rank={rank}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={endpoint}", "--rdzv-id=faults", DRIVER,
                 *flags(tmp_path, pca_file, "--max-steps", "4")),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-1500:] for _, err in outs]
    one_node = [r["loss"] for r in records(ddp_reference) if r["kind"] == "log"][:2]
    two_nodes = [r["loss"] for r in records(tmp_path) if r["kind"] == "log"]
    assert len(two_nodes) == 2 and two_nodes == pytest.approx(one_node, rel=1e-5)


def test_a_finished_run_is_never_replaced_silently(tmp_path, pca_file):
    run(tmp_path, pca_file, "--max-steps", "3")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match=r"holds another run's files \(checkpoint.pt, grid.png, "
                       r"log.jsonl\); continue it with --resume auto .*or pass --overwrite"):
        run(tmp_path, pca_file, "--max-steps", "2")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    run(tmp_path, pca_file, "--max-steps", "2", "--overwrite")          # on purpose
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in records(tmp_path) if r["kind"] == "log"] == [2]   # a fresh log
    with pytest.raises(UserError, match="pass one of them"):
        run(tmp_path, pca_file, "--overwrite", "--resume", "auto")


def test_a_resumed_log_reads_as_one_run(tmp_path, pca_file):
    # the run dies in step 11, after logging steps 8 and 10 past its last checkpoint (the epoch-1
    # save at step 6); the resumed log drops what it replays and marks the join
    p = driver(tmp_path, pca_file, "kill-step:11")
    assert p.returncode == -signal.SIGKILL
    assert [r["step"] for r in records(tmp_path) if r["kind"] == "log"][-1] == 10
    run(tmp_path, pca_file, "--resume", "auto", "--max-steps", "12")
    recs = records(tmp_path)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("resume") == 1 and recs[kinds.index("resume")]["step"] == 6
    assert [r["step"] for r in recs if r["kind"] == "log"] == [2, 4, 6, 8, 10, 12]
    assert_log_reads_as_one_run(tmp_path)


def enospc_after_half(monkeypatch, victims):
    """torch.save writes half of its bytes, then the disk is full (for paths matching victims)."""
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if not any(v in str(path) for v in victims):
            return real_save(obj, path, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path, pca_file, monkeypatch):
    run(tmp_path, pca_file, "--max-steps", "6")                          # epoch 1 saved
    good = (tmp_path / "checkpoint.pt").read_bytes()
    enospc_after_half(monkeypatch, ["checkpoint"])
    with pytest.raises(UserError) as e:
        run(tmp_path, pca_file, "--resume", "auto", "--max-steps", "12")
    msg = str(e.value)
    assert "no space left on the device writing" in msg and "checkpoint-0002.pt" in msg
    assert "MB free in" in msg and "needs about" in msg and "still holds step 6" in msg
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # tokenizer_pca --out and linprobe's head.pt: the same one line, nothing half-written left
    out = tmp_path / "pca_out.pt"
    argv = ["--dataset", "synthetic", "--synthetic-size", "16", "--input-size", "32",
            "--patch-size", "4", "--num-workers", "0", "--out", str(out)]
    enospc_after_half(monkeypatch, ["pca_out"])
    with pytest.raises(UserError, match="no space left on the device writing .*pca_out.pt"):
        tokenizer_pca.main(tokenizer_pca.get_args_parser().parse_args(argv))
    assert not [f for f in os.listdir(tmp_path) if "pca_out" in f]
    enospc_after_half(monkeypatch, ["head.pt"])
    probe = ["--baseline", "pixels", "--protocol", "cached", "--synthetic-size", "40",
             "--num-workers", "0", "--output-dir", str(tmp_path / "probe")]
    with pytest.raises(UserError, match="no space left on the device writing .*head.pt"):
        linprobe.main(linprobe.get_args_parser().parse_args(probe))
    assert not [f for f in os.listdir(tmp_path / "probe") if f.endswith(".tmp")]


def test_writes_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    files.save_torch({"x": torch.ones(3)}, str(tmp_path / "f.pt"))
    assert events == ["fsync", "replace", "fsync"]                    # file, rename, folder


@pytest.mark.parametrize("extra, msg", [
    (["--synthetic-size", "40"], "trained with --synthetic-size 48, this run asks for 40"),
    (["--synthetic-seed", "1"], "--synthetic-seed 0, this run asks for 1"),
    (["--lr", "2e-3"], "--lr 0.001, this run asks for 0.002"),
    (["--blr", "1e-3"], r"--blr [0-9.e-]+, this run asks for 0.001"),
    (["--aug", "rrc"], "--aug center, this run asks for rrc"),
    (["--ema", "0"], "--ema 0.9, this run asks for 0.0"),
    (["--epochs", "4"], "--epochs 3.0, this run asks for 4.0.*a longer run is a new run"),
    (["--accum-iter", "2"], "world x --accum-iter = 1, this run has 2"),
    (["--dataset", "imagefolder", "--data-path", "/x"],
     "--dataset synthetic, this run asks for imagefolder"),
    (["--latent-dim", "12"], "the checkpoint's model .* differs from this run's"),
])
def test_resume_refuses_what_would_change_the_run(tmp_path, pca_file, extra, msg):
    run(tmp_path, pca_file, "--max-steps", "2")
    with pytest.raises(UserError, match=msg):
        run(tmp_path, pca_file, "--resume", "auto", "--max-steps", "4", *extra)


def test_resume_refuses_another_image_folder(tmp_path, pca_file):
    # the same flags but another --data-path: other images under the same step count
    from PIL import Image
    folders = []
    for name in ("a", "b"):
        for label in ("0", "1"):
            (tmp_path / name / label).mkdir(parents=True)
            for i in range(8):
                pixels = (torch.rand(32, 32, 3) * 255).byte().numpy()
                Image.fromarray(pixels).save(tmp_path / name / label / f"{i}.png")
        folders.append(["--dataset", "imagefolder", "--data-path", str(tmp_path / name)])
    out = tmp_path / "run"
    run(out, pca_file, "--max-steps", "1", *folders[0])
    with pytest.raises(UserError, match=f"--data-path {tmp_path / 'a'}, this run asks for"):
        run(out, pca_file, "--resume", "auto", "--max-steps", "2", *folders[1])


def test_resume_allows_safe_changes_and_says_which(tmp_path, pca_file, capsys):
    run(tmp_path, pca_file, "--max-steps", "2")
    run(tmp_path, pca_file, "--resume", "auto", "--max-steps", "4", "--log-every", "1",
        "--grad-checkpoint")
    out = capsys.readouterr().out
    assert "changed: --max-steps 2 -> 4, --log-every 2 -> 1" in out
    assert records(tmp_path)[-1]["step"] == 4


def test_resume_of_weights_that_do_not_fit_their_config_is_one_line(tmp_path, pca_file):
    run(tmp_path, pca_file, "--max-steps", "2")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ck["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="weights do not fit its model config"):
        run(tmp_path, pca_file, "--resume", "auto", "--max-steps", "4")


class Gadget:            # a class a pickle can name: loading it would run code
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_pickled_object_is_refused_in_plain_words(tmp_path, pca_file, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": Gadget()}, path)
    for load in (lambda: registry.load(str(path)),
                 lambda: run(tmp_path / "x", str(path))):
        with pytest.raises(UserError) as e:
            load()
        assert "refused" in str(e.value) and "would run" in str(e.value)
        assert "weights_only" not in str(e.value)
    assert "this would have run" not in capsys.readouterr().out


def bad_flag(main_module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main_module.get_args_parser().parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "-3"], "--epochs: must be > 0"), (["--epochs", "0"], "--epochs: must be > 0"),
    (["--max-steps", "0"], "--max-steps: must be >= 1"), (["--max-steps", "-5"], "must be >= 1"),
    (["--ema", "1.5"], "--ema: must be in [0, 1)"), (["--save-every", "0"], "--save-every"),
    (["--log-every", "0"], "--log-every"), (["--grid-every", "0"], "--grid-every"),
    (["--patch-size", "0"], "--patch-size: must be >= 1"), (["--num-workers", "-1"], ">= 0"),
    (["--batch-size", "0"], "--batch-size"), (["--schedule", "cosine"], "invalid choice"),
])
def test_bad_pretrain_flags_stop_at_parse_time_in_one_line(argv, msg, capsys):
    assert msg in bad_flag(pretrain, ["--model", "vit_tiny", *argv], capsys)


@pytest.mark.parametrize("extra, msg", [
    (["--latent-dim", "0"], "latent_dim 0 .*must be in 1..48"),
    (["--latent-dim", "49"], "latent_dim 49 .*must be in 1..48"),
    (["--patch-size", "5"], "image size 32 .*multiple of the patch size 5"),
    (["--input-size", "30"], "image size 30 .*multiple of the patch size 4"),
    (["--class-cond", "true"], "--class-cond: not a flag of --model vit_tiny"),
])
def test_bad_model_flags_are_one_line_before_any_work(tmp_path, pca_file, extra, msg):
    with pytest.raises(UserError, match=msg):
        run(tmp_path, pca_file, *extra)
    assert not os.path.exists(tmp_path / "log.jsonl")


@pytest.fixture
def ckpt(tiny_ckpt):
    return tiny_ckpt


def read_only_under(folder):
    """open() as on a read-only file system below `folder` (root ignores chmod, so a test cannot
    make a folder read-only for itself)."""
    def read_only(path, mode="r", *args, **kwargs):
        if str(folder) in str(path) and "r" not in mode:
            raise OSError(errno.EROFS, "Read-only file system")
        return open(path, mode, *args, **kwargs)
    return read_only


def test_bad_probe_flags_and_outputs(tmp_path, ckpt, capsys, monkeypatch):
    err = bad_flag(linprobe, [ckpt, "--max-device-batch", "0"], capsys)
    assert "--max-device-batch: must be >= 1" in err
    assert "--probe-t: must be >= 0" in bad_flag(linprobe, [ckpt, "--probe-t", "-5"], capsys)
    parse = linprobe.get_args_parser().parse_args
    common = ["--protocol", "cached", "--synthetic-size", "40", "--num-workers", "0"]
    argv = [ckpt, *common, "--probe-t", "1000", "--output-dir", str(tmp_path / "a")]
    with pytest.raises(UserError, match=r"probe levels t must be in 0..999"):
        linprobe.main(parse(argv))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--output-dir .*file is not writable"):
        linprobe.main(parse([ckpt, *common, "--output-dir", str(tmp_path / "file")]))
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(files, "open", read_only_under(tmp_path / "ro"), raising=False)
    with pytest.raises(UserError, match="--output-dir .*ro is not writable .Read-only file system"):
        linprobe.main(parse([ckpt, *common, "--output-dir", str(tmp_path / "ro")]))
    monkeypatch.undo()
    ck = torch.load(ckpt, weights_only=True)
    ck["model_config"]["name"] = "vit_huge"
    torch.save(ck, tmp_path / "unknown.pt")
    unknown = str(tmp_path / "unknown.pt")
    with pytest.raises(UserError, match="'vit_huge' is not in this version's registry"):
        linprobe.main(parse([unknown, *common, "--output-dir", str(tmp_path / "b")]))
    ck["model_config"].update(name="vit_tiny", patch_size=5)
    torch.save(ck, tmp_path / "badsize.pt")
    badsize = str(tmp_path / "badsize.pt")
    with pytest.raises(UserError, match="model config cannot be built"):
        linprobe.main(parse([badsize, *common, "--output-dir", str(tmp_path / "c")]))


def test_bad_tokenizer_flags_and_outputs(tmp_path, capsys, monkeypatch):
    assert "--patch-size: must be >= 1" in bad_flag(tokenizer_pca, ["--patch-size", "0"], capsys)
    assert "--batch-size: must be >= 1" in bad_flag(tokenizer_pca, ["--batch-size", "0"], capsys)
    parse = tokenizer_pca.get_args_parser().parse_args
    argv = ["--synthetic-size", "16", "--input-size", "32", "--patch-size", "4",
            "--num-workers", "0"]
    with pytest.raises(UserError, match="is a folder; pass a file name"):
        tokenizer_pca.main(parse([*argv, "--out", str(tmp_path)]))
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(files, "open", read_only_under(tmp_path / "ro"), raising=False)
    with pytest.raises(UserError, match="the folder of --out .*ro is not writable"):
        tokenizer_pca.main(parse([*argv, "--out", str(tmp_path / "ro" / "pca.pt")]))


def png16(path, pixels):
    """A 16-bit PNG (gray (H, W) or RGB (H, W, 3) uint16) written by hand: nothing else here can."""
    h, w = pixels.shape[:2]
    color = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind, body):
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))


def test_16_bit_pngs_decode_like_the_pil_path_alone_and_mixed(tmp_path):
    import numpy as np
    ramp = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    files = {"gray16.png": ramp,
             "rgb16.png": np.stack([ramp, ramp[::-1], np.full_like(ramp, 30000)], -1)}
    for name, pixels in files.items():
        png16(tmp_path / name, pixels)
    pack_data.write_jpeg_folder(tmp_path / "jpg", 2, size=(48, 40))
    jpeg = next(p for p in (tmp_path / "jpg").rglob("*.jpg"))
    paths = [str(tmp_path / n) for n in files] + [str(jpeg)]
    raws = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in paths]
    tf = transforms.build_transform("center", 32)
    pil = torch.stack([tf(datasets._checked_loader(p)) for p in paths])
    for part in (slice(0, 1), slice(1, 2), slice(0, 3)):            # alone, and mixed with a JPEG
        out = decode.decode_batch(raws[part], 32, "center", "cpu", names=paths[part])
        assert out.min() >= -1 and out.max() <= 1
        assert (out - pil[part]).abs().mean() < 0.02
    assert pil[0].std() > 0.3                                       # the gray ramp is not clipped


def test_an_empty_class_folder_is_named(tmp_path, capsys):
    root = pack_data.write_jpeg_folder(tmp_path / "imgs", 20, size=(40, 32))
    (tmp_path / "imgs" / "zebra").mkdir()
    args = datasets.add_data_args(cli.ArgumentParser()).parse_args(
        ["--dataset", "imagefolder", "--data-path", str(root)])
    datasets.build_dataset(args, "train", transforms.build_transform("center", 32))
    out = capsys.readouterr().out
    assert "1 class folder(s) of" in out and "hold no images: zebra" in out


NODE_FIRST = """
import os, sys, time
sys.path.insert(0, {root!r})
from util import distributed
rank, world, _ = distributed.setup_distributed()

def build():
    with open({log!r}, "a") as f:
        f.write(f"start {{rank}}\\n")
    if rank == 0:
        time.sleep(1.0)          # a slow preparation: the other rank must wait for it
    with open({log!r}, "a") as f:
        f.write(f"end {{rank}}\\n")
    return rank

assert distributed.node_first(build, world) == rank
"""


def test_the_training_set_is_built_on_local_rank_zero_before_the_other_ranks(tmp_path):
    # under torchrun the ranks of a node build the training set (and so prepare a shared cache)
    # one after the other: local rank 0 first, then the rest; run in parallel they interleave
    log = str(tmp_path / "order.txt")
    code = NODE_FIRST.format(root=ROOT, log=log)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                      stderr=subprocess.PIPE))
    assert all(p.wait(timeout=120) == 0 for p in procs)
    with open(log) as f:
        assert f.read().split() == ["start", "0", "end", "0", "start", "1", "end", "1"]
