"""What a hostile user can hand the scripts, class by class and over every script: every numeric
flag, every file a script reads, every output path, a folder two runs share, a resume whose data
or teacher changed, a flag the settings ignore, a request larger than the machine, a real full
disk, odd folder entries and Ctrl-C. Each is refused in one `error:` line (exit 2) that names the
problem and the fix, before any work where it can be (docs/USAGE.md, "Runs are never lost")."""
import argparse
import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import bench_pca
import bench_train
import bench_vit_step
import distill
import export_timm
import gpu_check
import linprobe
import pack_data
import pretrain
import tokenizer_pca
from conftest import tiny_flags, tiny_run
from util import checkpoint, cli, datasets, files, registry
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every parser of the project, with the least argv it parses
PARSERS = [("pretrain.py", pretrain, []), ("linprobe.py", linprobe, ["ck.pt"]),
           ("distill.py", distill, ["--teacher", "t.pt"]), ("tokenizer_pca.py", tokenizer_pca, []),
           ("export_timm.py", export_timm, ["ck.pt", "--out", "x.pt"]),
           ("pack_data.py pack", pack_data, ["pack", "--out", "x.u8"]),
           ("pack_data.py bench", pack_data, ["bench", "--data-path", "x"]),
           ("bench_train.py", bench_train, []), ("bench_pca.py", bench_pca, []),
           ("bench_vit_step.py", bench_vit_step, []), ("gpu_check.py", gpu_check, ["--out", "x"])]


def actions(parser, argv):
    """The parser's actions, those of the sub-command argv names included."""
    found = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += action.choices[argv[0]]._actions
    return found


def one_line_exit_2(run, capsys):
    """run() exits 2, no traceback, its last line on stderr `error: ...` (above it, at most the
    progress bars of the work done) -> that line."""
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert e.value.code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    return last


# ---- Numbers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, module, argv", PARSERS, ids=[p[0] for p in PARSERS])
def test_every_numeric_flag_states_its_range_and_refuses_nan_inf_and_out_of_range(
        name, module, argv, capsys):
    parser = module.get_args_parser()
    assert not [a.dest for a in actions(parser, argv) if a.type in (int, float)]   # all bounded
    numeric = [a for a in actions(parser, argv) if hasattr(a.type, "rule")
               and a.type is not cli.device]
    assert numeric
    for action in numeric:
        assert "(must be " in cli.HelpFormatter(name)._get_help_string(action), action.dest
        option = action.option_strings[-1]
        bad = ["nan", "inf", "-inf", "-1"]
        if action.type is cli.SEED:
            bad.append(str(2 ** 64))
        for value in bad:
            err = one_line_exit_2(lambda: parser.parse_args([*argv, option, value]), capsys)
            assert option in err, (option, value, err)


def test_seeds_take_63_bits_and_every_script_has_one(capsys):
    for name, module, argv in PARSERS[:4]:
        parser = module.get_args_parser()
        assert parser.parse_args([*argv, "--seed", str(2 ** 63 - 1)]).seed == 2 ** 63 - 1
        one_line_exit_2(lambda: parser.parse_args([*argv, "--seed", str(2 ** 63)]), capsys)


def test_a_device_this_machine_lacks_is_refused_at_parse_time(capsys):
    parse = tokenizer_pca.get_args_parser().parse_args
    assert "is not a device" in one_line_exit_2(lambda: parse(["--device", "foo"]), capsys)
    if not torch.cuda.is_available():
        assert "no such device" in one_line_exit_2(lambda: parse(["--device", "cuda"]), capsys)


def test_a_flag_the_settings_ignore_is_refused_or_honoured(tmp_path, tiny_ckpt, pca_file):
    probe = ["--synthetic-size", "40", "--num-workers", "0", "--output-dir", str(tmp_path / "p")]
    parse = linprobe.get_args_parser().parse_args
    cases = [(["--protocol", "cached", "--lr-grid", "1"], "--lr-grid would be ignored without "
              "a cached LARS head"),
             (["--protocol", "knn", "--holdout", "0.2"], "--holdout would be ignored by "
              "--protocol knn"),
             (["--protocol", "cached", "--knn-k", "5"], "--knn-k would be ignored without k-NN"),
             (["--protocol", "cached", "--select-images", "50"], "--select-images would be"),
             (["--protocol", "cached", "--accum-iter", "2"], "--accum-iter would be ignored")]
    for flags, msg in cases:
        with pytest.raises(UserError, match=msg):
            linprobe.main(parse([tiny_ckpt, *probe, *flags]))
    with pytest.raises(UserError, match="--pca-images would be ignored with --pca FILE"):
        tiny_run(tmp_path / "a", pca_file, "--pca-images", "100")
    parse = distill.get_args_parser().parse_args
    for flags, msg in [(["--t", "5"], "--t would be ignored by --t-policy rl"),
                       (["--t-policy", "fixed", "--entropy-reg", "0.5"], "--entropy-reg would")]:
        with pytest.raises(UserError, match=msg):
            distill.main(parse(["--teacher", tiny_ckpt, "--output-dir", str(tmp_path / "d"),
                                *flags]))
    # honoured: a small model's lr is a default, so an explicit --blr sets it
    args = pretrain.get_args_parser().parse_args(["--model", "vit_tiny", "--blr", "0.004"])
    assert (args.lr, args.blr) == (None, 0.004)


def test_requests_larger_than_the_machine_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "available_memory", lambda: 2 ** 30)          # a 1 GB machine
    with pytest.raises(UserError, match="--synthetic-size 100000000 needs about 1.6 GB"):
        datasets.build_dataset(argparse.Namespace(dataset="synthetic", synthetic_size=10 ** 8,
                                                  input_size=32), "train", None)
    with pytest.raises(UserError, match=r"--model vit_b at 256 px, batch \d+ needs about"):
        pretrain.main(pretrain.get_args_parser().parse_args(
            ["--model", "vit_b", "--output-dir", str(tmp_path / "b"), "--synthetic-size", "64"]))
    with pytest.raises(UserError, match="--patch-size 64 .D = 12288. needs about 4.8 GB"):
        tokenizer_pca.main(tokenizer_pca.get_args_parser().parse_args(
            ["--patch-size", "64", "--input-size", "64", "--out", str(tmp_path / "p.pt")]))
    assert not os.path.exists(tmp_path / "b" / "pca.pt")                   # nothing was done


# ---- Files a script reads ---------------------------------------------------------------------
def malformed(tiny_ckpt):
    """{name: object}: files that load (tensors only) but are not what a reader wants."""
    ck = torch.load(tiny_ckpt, weights_only=True)
    nan = copy.deepcopy(ck)
    nan["ema"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    pca = ck["pca"]
    return {"a list": [1, 2], "a string": "vit_tiny", "an empty dict": {},
            "model_config a string": {**ck, "model_config": "vit_tiny"},
            "step a tensor": {**ck, "step": torch.tensor(3)},
            "no args": {k: v for k, v in ck.items() if k != "args"},
            "NaN weights": nan, "a PCA basis": pca, "a checkpoint": ck,
            "PCA of the wrong shape": {**pca, "components": pca["components"][:5]},
            "PCA without components": {k: v for k, v in pca.items() if k != "components"},
            "PCA with NaN": {**pca, "eigenvalues": pca["eigenvalues"] * float("nan")},
            "latents of lists": {"latents": [[0.0]], "labels": [0]},
            "integer latents": {"latents": torch.zeros(2, 1, 2, 2, dtype=torch.long),
                                "labels": torch.zeros(2, dtype=torch.long)}}


READERS = {   # reader -> (the variants it takes)
    "checkpoint (linprobe, export_timm, distill --teacher)": (registry.load,
                                                              {"no args", "a checkpoint"}),
    "--resume checkpoint": (lambda p: checkpoint.load_checkpoint(p, checkpoint.RESUMABLE),
                            {"a checkpoint"}),
    "--pca file": (lambda p: registry.load_pca(files.load_torch(p, "--pca file", "x"), p),
                   {"a PCA basis"}),
    "--latents-file": (datasets.LatentFile, set()),
}


def test_every_reader_refuses_every_malformed_file_in_one_line_naming_it(tmp_path, tiny_ckpt):
    count = 0
    for variant, obj in malformed(tiny_ckpt).items():
        path = str(tmp_path / f"{variant.replace(' ', '_')}.pt")
        torch.save(obj, path)
        for reader, (read, takes) in READERS.items():
            if variant in takes:
                read(path)
                continue
            with pytest.raises(UserError) as e:
                read(path)
            assert path in str(e.value), (reader, variant, str(e.value))
            count += 1
    assert count == 14 * 4 - 4
    with pytest.raises(UserError, match="NaN or infinite weights .*diverged"):
        registry.load(str(tmp_path / "NaN_weights.pt"))


def test_a_packed_meta_file_that_loads_but_is_wrong_is_refused(tmp_path):
    images = tmp_path / "p.u8"
    import numpy as np
    np.save(str(tmp_path / "p.npy"), np.zeros((2, 3, 8, 8), np.uint8))
    os.replace(tmp_path / "p.npy", images)
    good = {"version": 1, "shape": [2, 3, 8, 8], "size": 8, "labels": torch.zeros(2),
            "classes": ["a"], "fingerprint": datasets.pack_fingerprint(str(images))}
    torch.save(good, str(images) + ".meta.pt")
    assert len(datasets.Packed(str(images))) == 2
    for bad in ([1], {**good, "labels": [0, 0]}, {**good, "classes": "a"}, {**good, "shape": 2},
                {**good, "fingerprint": "0"}):
        torch.save(bad, str(images) + ".meta.pt")
        with pytest.raises(UserError, match="p.u8"):
            datasets.Packed(str(images))


# ---- Outputs: nothing replaced that this run did not write ------------------------------------
def test_no_script_writes_over_a_file_it_did_not_create(tmp_path, tiny_ckpt, pca_file):
    run = tmp_path / "run"                     # a finished pretraining run
    tiny_run(run, pca_file, "--max-steps", "1")
    kept = {name: (run / name).read_bytes() for name in os.listdir(run)}
    # a probe into the pretraining folder writes its own files beside the run's
    probe = [str(run / "checkpoint.pt"), "--protocol", "knn", "--synthetic-size", "40",
             "--num-workers", "0", "--output-dir", str(run)]
    linprobe.main(linprobe.get_args_parser().parse_args(probe))
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert (run / "probe_log.jsonl").exists()
    with pytest.raises(UserError, match="probe_log.jsonl exists and this run did not write it"):
        linprobe.main(linprobe.get_args_parser().parse_args(probe))
    linprobe.main(linprobe.get_args_parser().parse_args([*probe, "--overwrite"]))
    export = export_timm.get_args_parser().parse_args
    with pytest.raises(UserError, match="is this run's own input"):
        export_timm.main(export([str(run / "checkpoint.pt"), "--out", str(run / "checkpoint.pt"),
                                 "--overwrite"]))
    with pytest.raises(UserError, match="log.jsonl exists .*pass --overwrite"):
        export_timm.main(export([str(run / "checkpoint.pt"), "--out", str(run / "log.jsonl")]))
    fit = tokenizer_pca.get_args_parser().parse_args
    small = ["--synthetic-size", "16", "--input-size", "32", "--patch-size", "4",
             "--num-workers", "0"]
    with pytest.raises(UserError, match="checkpoint.pt exists and this run did not write it"):
        tokenizer_pca.main(fit([*small, "--out", str(run / "checkpoint.pt")]))
    (tmp_path / "new_recon.png").write_bytes(b"a picture of another fit")
    with pytest.raises(UserError, match="new_recon.png exists"):
        tokenizer_pca.main(fit([*small, "--out", str(tmp_path / "new.pt")]))
    with pytest.raises(UserError, match="holds another run's files"):
        distill.main(distill.get_args_parser().parse_args(
            ["--teacher", tiny_ckpt, "--output-dir", str(run), "--synthetic-size", "40"]))
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_a_training_folder_is_never_mixed_or_replaced(tmp_path, pca_file):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_run(a, pca_file, "--max-steps", "6")                  # checkpoint-0001.pt and more
    os.remove(a / "checkpoint.pt")                             # only the epoch files are left
    with pytest.raises(UserError, match="holds another run's files .checkpoint-0001.pt"):
        tiny_run(a, pca_file, "--max-steps", "1")
    tiny_run(b, pca_file, "--max-steps", "1")
    with pytest.raises(UserError, match="resume .*checkpoint-0001.pt into its own folder"):
        tiny_run(b, pca_file, "--resume", str(a / "checkpoint-0001.pt"))
    tiny_run(a, pca_file, "--max-steps", "2", "--overwrite")   # the old run goes whole
    assert "checkpoint-0001.pt" not in os.listdir(a)
    assert torch.load(a / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_run_folder_has_one_owner_and_a_dead_owners_lock_is_taken_over(
        tmp_path, pca_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{owner.pid} {socket.gethostname()} 2026-01-01 00:00:00\n")
        with pytest.raises(UserError, match=f"in use by the run of pid {owner.pid}"):
            tiny_run(out, pca_file, "--max-steps", "1")
    finally:
        owner.kill()
        owner.wait()
    tiny_run(out, pca_file, "--max-steps", "1")               # the owner is gone
    assert f"taking over {out / '.lock'}" in capsys.readouterr().out
    assert not (out / ".lock").exists()                       # released at the run's end


# ---- Resume: the same data, the same teacher --------------------------------------------------
def test_resume_refuses_changed_folder_contents_and_a_changed_teacher(tmp_path, pca_file):
    jpegs = pack_data.write_jpeg_folder(tmp_path / "jpegs", 20, size=(48, 36))
    data = ["--dataset", "imagefolder", "--data-path", str(jpegs), "--input-size", "32"]
    tiny_run(tmp_path / "r", pca_file, "--max-steps", "1", *data)
    shutil.copy(jpegs / "disc" / "00000.jpg", jpegs / "disc" / "extra.jpg")
    with pytest.raises(UserError, match="the training data changed since the checkpoint"):
        tiny_run(tmp_path / "r", pca_file, "--resume", "auto", "--max-steps", "2", *data)
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tmp_path / "r" / "checkpoint.pt", teacher)
    student = ["--teacher", str(teacher), "--synthetic-size", "32", "--batch-size", "8",
               "--student", "vit_tiny", "--num-workers", "0", "--output-dir", str(tmp_path / "s")]
    parse = distill.get_args_parser().parse_args
    distill.main(parse([*student, "--max-steps", "1"]))
    ck = torch.load(teacher, weights_only=True)
    ck["ema"]["blocks.0.attn.qkv.weight"] += 0.01
    torch.save(ck, teacher)
    with pytest.raises(UserError, match="the teacher .*teacher.pt is not the one"):
        distill.main(parse([*student, "--max-steps", "2", "--resume", "auto"]))


# ---- A real full disk -------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (needs the right to mount: root on Linux)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip("this machine does not let the tests mount a small tmpfs (needs root)")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk):
    """Fill `disk` to the last byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with contextlib.suppress(OSError):
        while os.write(fd, b"\0" * 4096):
            pass
    os.close(fd)


def test_a_real_full_disk_is_one_line_for_every_script(tiny_disk, tiny_ckpt, pca_file, capsys):
    runs = {   # a checkpoint (3.9 MB) and a PCA basis (2.4 MB) fill the 2 MB disk by themselves
        "pretrain": (pretrain, tiny_flags(tiny_disk / "run", pca_file, "--max-steps", "1")),
        "tokenizer_pca": (tokenizer_pca, ["--synthetic-size", "16", "--input-size", "32",
                                          "--patch-size", "16", "--num-workers", "0",
                                          "--out", str(tiny_disk / "pca.pt")]),
        "export_timm": (export_timm, [tiny_ckpt, "--out", str(tiny_disk / "vit.pt")]),
        "linprobe": (linprobe, [tiny_ckpt, "--protocol", "cached", "--synthetic-size", "40",
                                "--num-workers", "0", "--output-dir", str(tiny_disk / "p")]),
    }
    for name, (module, argv) in runs.items():
        if name in ("export_timm", "linprobe"):               # small files: a full disk
            fill(tiny_disk)
        err = one_line_exit_2(lambda: cli.run_cli(module.main, module.get_args_parser(), argv),
                              capsys)
        assert "no space left on the device writing" in err, (name, err)
        assert not [f for f in os.walk(tiny_disk) for f in f[2] if f.endswith(".tmp")]
        files.release_locks()


# ---- Odd folder entries, Ctrl-C ---------------------------------------------------------------
def test_odd_folder_entries_are_skipped_with_a_count_never_a_hang(tmp_path, capsys):
    root = pack_data.write_jpeg_folder(tmp_path / "jpegs", 10, size=(48, 36))
    os.mkfifo(root / "disc" / "fifo.jpg")                      # reading it would block forever
    os.symlink(tmp_path / "gone.jpg", root / "disc" / "dangling.jpg")
    (root / "disc" / "folder.jpg").mkdir()
    args = argparse.Namespace(dataset="imagefolder", data_path=str(root), decode="pil")
    ds = datasets.build_dataset(args, "train", None)
    assert len(ds) + len(datasets.build_dataset(args, "val", None)) == 10
    assert "skipped 2 entries of" in capsys.readouterr().out


def test_a_worker_stopped_mid_handover_adds_no_thread_traceback(capsys, monkeypatch):
    # the race test_ctrl_c_... below can hit: multiprocessing's fd-sharing thread (in
    # resource_sharer.py) ends in EOFError when Ctrl-C stops the worker handing a tensor over
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)   # restored afterwards
    scope = {}
    exec(compile("def serve():\n    raise EOFError\n", "/py/multiprocessing/resource_sharer.py",
                 "exec"), scope)

    def in_thread(target):
        t = threading.Thread(target=target)
        t.start()
        t.join()

    def other():
        raise ValueError("a bug in a thread")
    cli.run_cli(lambda args: in_thread(scope["serve"]), cli.ArgumentParser(prog="x"), [])
    assert capsys.readouterr().err == ""
    in_thread(other)                                          # every other thread error shows
    assert "ValueError: a bug in a thread" in capsys.readouterr().err


def forked_children(pid):
    """pid's children that are forks of it (DataLoader workers), not a program that an import
    runs (a Ctrl-C then would land in `import torch`, before the script's handler exists)."""
    def cmdline(p):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                return f.read()
        except OSError:                                       # it ended meanwhile
            return None
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    return [k for k in kids if cmdline(k) == cmdline(pid)]


@pytest.mark.parametrize("argv", [
    ["tokenizer_pca.py", "--synthetic-size", "100000", "--input-size", "32", "--patch-size", "4",
     "--num-workers", "2", "--num-images", "100000"],
    ["linprobe.py", "--baseline", "pixels", "--protocol", "knn", "--synthetic-size", "100000",
     "--input-size", "32", "--num-workers", "2", "--max-device-batch", "64"]],
    ids=["pca-fit", "feature-pass"])
def test_ctrl_c_with_workers_running_is_one_line_and_exit_130(tmp_path, argv):
    out = ["--out", str(tmp_path / "pca.pt")] if argv[0] == "tokenizer_pca.py" else \
        ["--output-dir", str(tmp_path / "probe")]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:], *out], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    started = time.time()                                     # until both workers are running
    while p.poll() is None and time.time() - started < 60 and len(forked_children(p.pid)) < 2:
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(p.pid, signal.SIGINT)                           # Ctrl-C reaches the whole group
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1] == "interrupted (Ctrl-C)"
