"""tests/gpu_check.py in its dry-run form (CPU, tiny sizes): every check of the GPU run executes
here, the report and results are written, and the checks are real: a checkpoint tensor changed
behind the resume check's back makes it fail (and only it). Also the child-process runner the
device uses (results, time limit) and the input errors. No timing asserts."""
import json
import math
import os

import pytest
import torch

import gpu_check
from util import cli, registry

FINAL_STEP = gpu_check.SIZES["dry"]["synth"] // gpu_check.SIZES["dry"]["batch"] * \
    gpu_check.SIZES["dry"]["resume_epochs"]


def parse(*argv):
    return gpu_check.get_args_parser().parse_args(list(argv))


def test_dry_run_runs_every_check_and_a_changed_tensor_fails_the_resume_check(tmp_path,
                                                                              monkeypatch):
    real_load = registry.load

    def load_with_one_changed_weight(path):
        # the final checkpoint of the killed-and-resumed run only: one weight off by 1e-3
        ck = real_load(path)
        if "_resumed" in path and ck["step"] == FINAL_STEP:
            w = ck["model"]["blocks.0.attn.qkv.weight"].clone()
            w[0, 0] += 1e-3
            ck["model"]["blocks.0.attn.qkv.weight"] = w
        return ck

    monkeypatch.setattr(registry, "load", load_with_one_changed_weight)
    out = tmp_path / "out"
    res = gpu_check.main(parse("--out", str(out), "--dry-run"))
    # everything lands in --out itself, three files (the device returns <= 8, 2 folders deep)
    assert sorted(os.listdir(out)) == ["log.txt", "report.md", "results.json"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert res["meta"]["dry_run"] and res["meta"]["device"] == "cpu" and not res["skipped"]
    # every planned check ran, in dry-run form
    by_id = {c["id"]: c for c in res["checks"]}
    planned = {cid for cid, _, _ in gpu_check.plan(DrySession())}
    # learning.start only starts the training: learning.train records it
    ran = {cid if cid in gpu_check.EST or cid.split(".")[0] not in gpu_check.EST
           else cid.split(".")[0] for cid in by_id}
    ran.add("learning.start")
    assert planned == ran, planned ^ ran
    # the changed tensor is caught, and named; every other check passes
    assert by_id["resume"]["status"] == "fail" and "blocks.0.attn.qkv.weight" in \
        by_id["resume"]["measured"]
    assert "IS bitwise reproducible" in by_id["resume"]["note"]    # the repeat-run diagnosis ran
    assert [c["id"] for c in res["checks"] if c["status"] != "pass"] == ["resume"]
    assert res["ok"] is False
    report = (out / "report.md").read_text()
    assert "| resume | **FAIL** |" in report and "| torchrun | **PASS** |" in report
    assert "DRY RUN" in report and "## Speed table" in report and "## Learning" in report
    # the figures behind the tables are there and sane
    rows = {(b["model"], b["compile"]): b for b in res["benchmarks"]}
    assert set(rows) == {(m, c) for m, _ in gpu_check.SIZES["dry"]["bench"] for c in (False, True)}
    assert all(b["img_per_s"] > 0 and b["command"].startswith("python tools/bench_train.py --")
               for b in rows.values())
    assert res["features"]["img_per_s"] > 0 and res["features"]["ratio"] > 0
    assert res["profile"]["busy_ms"] > 0 and sum(res["profile"]["by_kind_ms"].values()) > 0
    learning = [r["top1"] for r in res["learning"]["rows"]]
    assert len(learning) == 4 and all(0 <= t <= 100 and math.isfinite(t) for t in learning)
    log = (out / "log.txt").read_text()
    assert all(f"===== {cid} =====" in log for cid in planned)


class DrySession:
    """What plan() reads of a session, for the dry run."""
    dry = True
    size = gpu_check.SIZES["dry"]


def test_the_device_runner_children_give_results_and_are_killed_at_their_time_limit(tmp_path):
    args = parse("--out", str(tmp_path / "out"), "--dry-run", "--budget-s", "300",
                 "--work-dir", str(tmp_path / "work"))
    gpu_check.check_inputs(args, cuda=False)
    ctx = gpu_check.Session(args, torch.device("cpu"), dry=True)
    ctx.isolate = True                       # what the device does: each script in a child
    bench = ["--model", "vit_tiny", "--steps", "1", "--batch-size", "4", "--ema", "0"]
    handle = gpu_check.start_jobs(ctx, "tools/bench_train.py",
                                  {"ok": bench, "bad": ["--model", "vit_q"]}, timeout=240)
    assert all(p.poll() is None for p in handle["procs"].values())     # running in the background
    done = gpu_check.join_jobs(ctx, handle)
    result, err, late = done["ok"]
    assert result["kind"] == "benchmark" and result["img_per_s"] > 0 and err is None and not late
    result, err, late = done["bad"]
    assert result is None and "exited with code 2" in err and "unknown --model" in err
    with pytest.raises(gpu_check.RunError, match="did not finish in 1 s"):
        gpu_check.run_script(ctx, "tools/bench_train.py", bench, timeout=1)
    ctx.logf.close()


@pytest.mark.parametrize("argv, msg", [
    (["--budget-s", "0"], "--budget-s: must be > 0, got 0"),
    (["--only", "precision,warp"], "--only warp: unknown; choose from"),
    (["--fashion-mnist", "/nonexistent/fm"], "--fashion-mnist /nonexistent/fm is not a folder"),
])
def test_bad_inputs_stop_before_any_work(tmp_path, capsys, argv, msg):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.run_cli(gpu_check.main, gpu_check.get_args_parser(), ["--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err
    assert not out.exists() or not os.listdir(out)


def test_an_unwritable_out_and_missing_fashion_mnist_files_are_user_errors(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(cli.UserError, match="is not writable"):
        gpu_check.main(parse("--out", str(tmp_path / "a_file" / "out"), "--dry-run"))
    (tmp_path / "fm").mkdir()
    with pytest.raises(cli.UserError, match="file t10k-images-idx3-ubyte.* is missing"):
        gpu_check.main(parse("--out", str(tmp_path / "out"), "--fashion-mnist",
                             str(tmp_path / "fm")))
