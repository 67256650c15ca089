"""One command that verifies this project on a CUDA machine, offline, in under 8 minutes:
correctness of the CUDA paths, the speed table, and a few minutes of learning. Every section runs
through the project's own entry points (pretrain.py, linprobe.py, decode.decode_batch).

On the GPU machine (one H200 here; writes report.md, results.json and log.txt into --out, nothing
else; the Fashion-MNIST gz files are carried as the ignored folder .carry/fmnist):
  PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --out $OUT \
      --fashion-mnist .carry/fmnist --budget-s 450
Dry run (CPU, CI: tiny models, a couple of steps, synthetic data; automatic without CUDA):
  python tools/gpu_check.py --out /tmp/gpu_check --dry-run
Only some checks (names below; a section name selects all of its checks), e.g. a rerun of two:
  python tools/gpu_check.py --out $OUT --only resume,decode --budget-s 120

correctness  precision    a few l-DAE and DiT steps in bf16 vs fp32 (TF32 matmuls on CUDA):
                          losses and weight updates agree within TOL
             fused_adamw  the run's AdamW is fused on CUDA; fused == single-tensor AdamW
             torchrun     a 1-process torchrun run equals the plain process, every tensor, bitwise
             nccl         an NCCL (gloo on CPU) process group: all_reduce and a DDP step == plain
             resume       pretrain.py SIGKILLed after its first epoch checkpoint, then --resume
                          auto: every tensor of the final checkpoint == an uninterrupted run
             decode       decode.decode_batch on the device vs the PIL transforms (center, eval,
                          rrc): mean and 99.9th-percentile |difference|; a --decode gpu training run
             compile      --compile vs eager, the same steps: losses and updates within TOL
speed        gemm         a large bf16 matmul: the ceiling the MFU figures sit under
             speed_eager, speed_compile   tools/bench_train.py for vit_b, vit_half_l, vit_l and
                          dit_l_2 at 256 px (batch >= 64; --grad-checkpoint only after an OOM)
             features     the cached linear probe's feature pass (features.make_featurizer, bf16
                          autocast) vs the training step, img/s
             profile      torch.profiler over vit_b training steps: what bounds the step
learning     learning     l-DAE (--learn-model vit_small, 32 px, d = 8 whitened; batch 128, lr
                          4e-3) and a pixel DAE on Fashion-MNIST, trained side by side for
                          --learn-s seconds while the correctness checks run, then the cached
                          probe: learned vs random init vs pixel DAE vs raw pixels
Each check is independent: a failure is recorded (traceback in log.txt) and the run goes on.
--budget-s skips what would not fit in the time left, and says so. Exit code: 0 when every check
that ran passed, 1 otherwise; the last line printed is a summary and the report's path.
"""
import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench_train  # noqa: E402
import linprobe  # noqa: E402
import pack_data  # noqa: E402
import pretrain  # noqa: E402
from tokenizer_pca import fit_pca  # noqa: E402
from util import (cli, datasets, decode, features, files, registry,  # noqa: E402
                  synthetic, transforms)
from util.cli import UserError  # noqa: E402
from util.engine import Engine, LossModule  # noqa: E402

# Stated tolerances (the report prints each beside what was measured). bf16 keeps 8 significant
# bits (rounding 2^-9 relative); a loss that averages thousands of terms moves by far less than a
# percent over a few steps, where a wrong cast, a broken kernel or a compile bug moves it by tens
# of percent. Adam's first steps are nearly sign(gradient) steps, so gradients near zero flip
# sign between precisions: the weight updates agree less closely than the losses.
TOL = dict(
    loss_rel=0.03,       # max over the steps of |loss_a - loss_b| / |loss_b|
    update_rel=0.35,     # ||W_a - W_b|| / ||W_b - W_0||: the two runs' updates, W_0 the init
    fused_rel=1e-3,      # fused vs single-tensor AdamW: max |p_a - p_b| / max |p_b - p_0|
    decode_mean=0.02,    # mean |decode_batch - PIL| in [-1, 1] units (about 2.5 grey levels)
    decode_p999=0.25,    # 99.9th percentile of the same (max is reported, not checked)
    mfu_target=0.50,     # vit_b training MFU on an H100/H200 (reported, not a failure)
)

# What the checks run on a CUDA device, and in the dry run (CPU, CI: seconds per check).
SIZES = {
    "cuda": dict(
        ldae=["--model", "vit_small"],
        dit=["--model", "dit_s_1", "--input-size", "32", "--patch-size", "4", "--latent-dim", "8"],
        synth=512, batch=64, steps=6, resume_epochs=6, workers=2,
        jpegs=64, jpeg_size=(500, 375), decode_px=256, decode_batch=16,
        decode_run=["--model", "vit_small", "--input-size", "64"],
        bench=[("vit_b", 256), ("vit_half_l", 128), ("vit_l", 64), ("dit_l_2", 256)],
        bench_px=256, bench_steps=20, gemm=8192, feat_batch=512, feat_iters=20, prof_steps=3,
        learn_data=["--dataset", "fashion-mnist"], learn_batch=128, learn_workers=4, learn_px=[],
        probe_extra=["--num-workers", "4"]),
    "dry": dict(
        ldae=["--model", "vit_tiny"], dit=["--model", "dit_tiny_1"],
        synth=64, batch=16, steps=3, resume_epochs=3, workers=0,
        jpegs=24, jpeg_size=(48, 36), decode_px=32, decode_batch=4,
        decode_run=["--model", "vit_tiny"],
        bench=[("vit_tiny", 16), ("dit_tiny_1", 16)],
        bench_px=32, bench_steps=2, gemm=256, feat_batch=32, feat_iters=2, prof_steps=2,
        # 16 px: the raw-pixel probe whitens 768 dims, not 3072 (an eigh of seconds on 1 core)
        learn_data=["--dataset", "synthetic", "--synthetic-size", "128"], learn_batch=32,
        learn_px=["--input-size", "16"],
        learn_workers=0,
        probe_extra=["--num-workers", "0", "--synthetic-val-size", "32", "--max-iter", "10",
                     "--wd-grid", "1e-2"]),
}
# Seconds each check is expected to take on an H200 (what --budget-s plans with) and in the dry run.
# learning.train and learning wait for what runs in the background (at most --learn-s, and the
# probes' own time limit).
EST = {"learning.start": (5, 8), "precision": (20, 6), "fused_adamw": (5, 2),
       "torchrun": (30, 12), "nccl": (10, 2), "resume": (25, 8), "decode": (15, 4),
       "learning.train": (15, 6), "compile": (60, 10), "learning": (20, 2), "gemm": (5, 1),
       "features": (15, 2), "profile": (20, 3)}
# (eager, compiled): a child's start-up, the model's CPU init, warm-up, 20 timed steps; + compile
BENCH_EST = {"vit_b": (15, 120), "vit_half_l": (20, 130), "vit_l": (30, 220), "dit_l_2": (20, 130)}
SECTIONS = {"correctness": ("precision", "fused_adamw", "torchrun", "nccl", "resume", "decode",
                            "compile"),
            "speed": ("gemm", "speed_eager", "speed_compile", "features", "profile"),
            "learning": ("learning.start", "learning.train", "learning")}
CHECK_SECTION = {c.split(".")[0]: s for s, cs in SECTIONS.items() for c in cs}


class RunError(Exception):
    """A script run that failed: its exit code or exception, and the tail of its output."""

    def __init__(self, msg, text=""):
        super().__init__(msg)
        self.text = text


# ---- the session: settings, the log, the records, the report --------------------------------
class Session:
    def __init__(self, args, device, dry):
        self.args, self.device, self.dry = args, device, dry
        self.cuda = device.type == "cuda"
        self.size = SIZES["dry" if dry else "cuda"]
        # on the device the scripts run in child processes with a time limit (except runs of a
        # few steps), so a CUDA fault, an OOM or a hung compile cannot take the other checks with
        # it; the dry run stays in this process (no start-up costs in CI)
        self.isolate = not dry
        self.out = args.out
        self.work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
        os.makedirs(self.work, exist_ok=True)
        self.logf = open(os.path.join(self.out, "log.txt"), "w")
        self.t0 = time.time()
        self.budget = args.budget_s
        self.runs, self.memo, self.early, self.count = {}, {}, {}, 0
        threads = "1" if dry else os.environ.get("OMP_NUM_THREADS", "4")
        # tqdm reads TQDM_MININTERVAL: fewer progress lines in log.txt
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads,
                    "TQDM_MININTERVAL": "10"}
        self.results = {"meta": environment(device, dry, args), "tolerances": TOL, "checks": [],
                        "skipped": [], "benchmarks": [], "gemm": None, "features": None,
                        "profile": None, "learning": None, "ok": True}

    def left(self):
        return self.budget - (time.time() - self.t0)

    def fresh(self, name):
        """A new folder name under the work dir: no two runs share an --output-dir."""
        self.count += 1
        return os.path.join(self.work, f"{self.count:02d}_{name}")

    def log(self, text):
        self.logf.write(text.rstrip("\n") + "\n")
        self.logf.flush()

    def say(self, text):
        print(f"[gpu_check] {text}", flush=True)
        self.log(f"[gpu_check] {text}")

    def record(self, cid, status, measured, tolerance, note="", seconds=None):
        rec = {"id": cid, "section": CHECK_SECTION.get(cid.split(".")[0], "?"), "status": status,
               "measured": measured, "tolerance": tolerance, "note": note, "seconds": seconds}
        self.results["checks"].append(rec)
        self.say(f"{cid}: {status.upper()} {measured}" + (f" ({note})" if note else ""))
        return rec

    def check(self, cid, ok, measured, tolerance, note=""):
        return self.record(cid, "pass" if ok else "fail", measured, tolerance, note)

    def skip(self, cid, reason):
        self.results["skipped"].append({"id": cid, "reason": reason})
        self.say(f"{cid}: SKIPPED ({reason})")

    def save(self):
        checks = self.results["checks"]
        self.results["ok"] = all(c["status"] == "pass" for c in checks)
        self.results["meta"]["seconds"] = round(time.time() - self.t0, 1)
        write_atomic(os.path.join(self.out, "results.json"), json.dumps(self.results, indent=1))
        write_atomic(os.path.join(self.out, "report.md"), report(self.results))


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def environment(device, dry, args):
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": dry,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "command": " ".join([os.path.relpath(__file__, ROOT),
                                                         *sys.argv[1:]]),
            "budget_s": args.budget_s, "commit": git_commit()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu_mem_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                    driver=nvidia_driver())
    return meta


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             text=True, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ---- running the project's scripts ----------------------------------------------------------
@contextlib.contextmanager
def quiet(ctx):
    """Work done in this process: its output goes to log.txt. In the dry run also one CPU thread
    (CI shares two cores) and torch.compile on its "eager" backend: dynamo captures the same
    graphs, but nothing is code-generated (inductor's C++ build of even vit_tiny takes ~2 minutes
    on 2 busy cores, aot_eager ~7 s a model)."""
    threads, real_compile = torch.get_num_threads(), torch.compile
    if ctx.dry:
        torch.set_num_threads(1)
        torch.compile = functools.partial(real_compile, backend="eager")
    try:
        with contextlib.redirect_stdout(ctx.logf), contextlib.redirect_stderr(ctx.logf):
            yield
    finally:
        torch.compile = real_compile
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def spawn(ctx, cmd, name):
    """A child process in its own session (so a kill takes its DataLoader workers too), its output
    in a file of the work dir."""
    ctx.log(f"$ {' '.join(cmd)}")
    path = os.path.join(ctx.work, f"{name}.{ctx.count}.out")
    with open(path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ctx.env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.out_path = path
    return proc


def finish(ctx, proc, timeout):
    """Wait up to timeout seconds, else SIGKILL the child's process group.
    -> (exit code, timed out, its output)."""
    timed_out = False
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, timed_out = proc.wait(), True
    with open(proc.out_path, errors="replace") as f:
        text = f.read()
    ctx.log(text)
    return rc, timed_out, text


def last_json(text):
    """The scripts print one JSON object as their last line: the result."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RunError("no JSON result line in the output", text)


def child_result(script, rc, timed_out, text, timeout):
    if timed_out:
        raise RunError(f"{script} did not finish in {timeout:.0f} s (killed)", text)
    if rc != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])[-400:]
        raise RunError(f"{script} exited with code {rc}: {tail}", text)
    return last_json(text)


def run_script(ctx, script, argv, timeout, child=None):
    """python SCRIPT ARGV (pretrain.py, linprobe.py) -> its result dict: main()'s return value when
    run in this process, the child's last JSON line in a child (killed after timeout seconds).
    child None: a child on the device (ctx.isolate), this process in the dry run."""
    if not (ctx.isolate if child is None else child):
        ctx.log(f"$ python {script} {' '.join(argv)}   (in this process)")
        mod = {"pretrain.py": pretrain, "linprobe.py": linprobe,
               "tools/bench_train.py": bench_train}[script]
        with quiet(ctx):
            return mod.main(mod.get_args_parser().parse_args(argv))
    proc = spawn(ctx, [sys.executable, script, *argv], os.path.basename(script).split(".")[0])
    return child_result(script, *finish(ctx, proc, timeout), timeout)


def start_jobs(ctx, script, jobs, timeout):
    """{name: argv} of one script, all at once, collected later by join_jobs: on the device children
    that run in the background while other checks go on; in the dry run each runs to the end now."""
    if not ctx.isolate:
        return {"done": {k: (run_script(ctx, script, a, timeout), None, False)
                         for k, a in jobs.items()}}
    return {"script": script, "timeout": timeout, "deadline": time.time() + timeout,
            "procs": {k: spawn(ctx, [sys.executable, script, *a], k) for k, a in jobs.items()}}


def join_jobs(ctx, handle):
    """-> {name: (result or None, error message or None, timed out)}; a child still running at
    its deadline is killed."""
    if "done" in handle:
        return handle["done"]
    out = {}
    for k, proc in handle["procs"].items():
        rc, timed_out, text = finish(ctx, proc, handle["deadline"] - time.time())
        try:
            out[k] = (child_result(handle["script"], rc, timed_out, text, handle["timeout"]), None,
                      timed_out)
        except RunError as e:
            out[k] = (None, str(e), timed_out)
    return out


def train(ctx, name, argv, timeout=180, child=None):
    """pretrain.py ARGV in a fresh --output-dir -> that folder. The same ARGV twice is one run."""
    key = tuple(argv)
    if key not in ctx.runs:
        out = ctx.fresh(name)
        run_script(ctx, "pretrain.py", [*argv, "--output-dir", out], min(timeout, ctx.left() + 30),
                   child)
        ctx.runs[key] = out
    return ctx.runs[key]


def pca_file(ctx):
    """One 4 px patch PCA of 32 px synthetic shapes shared by the short runs (no per-run fit)."""
    path = os.path.join(ctx.work, "pca32.pt")
    if not os.path.exists(path):
        center = transforms.build_transform("center", 32)
        shapes = synthetic.SyntheticShapes(256, 32, transform=center)
        with quiet(ctx):
            files.save_torch(fit_pca(shapes, 4, progress=False, device="cpu").to_dict(), path)
    return path


def short_argv(ctx, model_argv, steps=None, epochs=1, extra=()):
    """A short synthetic run: constant-ish lr, EMA, a checkpoint per epoch, a log line per step."""
    s = ctx.size
    argv = [*model_argv, "--synthetic-size", s["synth"], "--batch-size", s["batch"],
            "--epochs", epochs, "--warmup-epochs", 0, "--lr", 1e-3, "--ema", 0.999,
            "--num-workers", s["workers"], "--pca", pca_file(ctx), "--log-every", 1,
            "--save-every", 1, "--grid-every", 1000, "--seed", ctx.args.seed]
    if steps:
        argv += ["--max-steps", steps]
    return [str(a) for a in [*argv, *extra]]


def resume_argv(ctx):
    return short_argv(ctx, ctx.size["ldae"], epochs=ctx.size["resume_epochs"])


def checkpoint(run_dir):
    return registry.load(os.path.join(run_dir, "checkpoint.pt"))


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "log"]


def float_tensors(state):
    return {k: v.double() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def agreement(run_a, run_b, w0, steps):
    """Two runs of the same steps -> (max relative loss difference, relative update difference)."""
    la, lb = logged_losses(run_a), logged_losses(run_b)
    if len(la) != steps or len(lb) != steps:
        raise RunError(f"expected {steps} logged steps, got {len(la)} and {len(lb)}")
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    wa, wb = float_tensors(checkpoint(run_a)["model"]), float_tensors(checkpoint(run_b)["model"])
    w0 = float_tensors(w0)
    diff = math.sqrt(sum((wa[k] - wb[k]).square().sum().item() for k in wb))
    update = math.sqrt(sum((wb[k] - w0[k]).square().sum().item() for k in wb))
    return loss_rel, diff / max(update, 1e-30)


def initial_weights(ctx, model_argv):
    """The init of a short run: the same run at lr 0 for one step (AdamW moves nothing)."""
    run = train(ctx, "init", short_argv(ctx, model_argv, steps=1, extra=["--lr", "0"]),
                child=False)
    return checkpoint(run)["model"]


def tensor_leaves(obj, prefix=""):
    """(dotted name, tensor) for every tensor in a nested dict / list (a checkpoint)."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in obj:
            yield from tensor_leaves(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensor_leaves(v, f"{prefix}.{i}")


def compare_checkpoints(path_a, path_b):
    """Every tensor of two pretrain.py checkpoints (weights, EMA, optimizer moments, scaler, PCA,
    RNG state; not the flags) -> (tensors compared, names that differ, max |difference|)."""
    a, b = registry.load(path_a), registry.load(path_b)
    ta = dict(tensor_leaves({k: v for k, v in a.items() if k != "args"}))
    tb = dict(tensor_leaves({k: v for k, v in b.items() if k != "args"}))
    differ, worst = sorted(set(ta) ^ set(tb)), 0.0
    if a["step"] != b["step"]:
        differ.append(f"step ({a['step']} vs {b['step']})")
    for name in [k for k in ta if k in tb]:
        x, y = ta[name], tb[name]
        if x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y):
            continue
        differ.append(name)
        if x.shape == y.shape and x.is_floating_point():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return len(ta), differ, worst


def bitwise(ctx, cid, path_a, path_b, what):
    n, differ, worst = compare_checkpoints(path_a, path_b)
    names = ", ".join(differ[:4]) + (" ..." if len(differ) > 4 else "")
    measured = f"{n} tensors, {len(differ)} differ" + (f" ({names}; max |diff| {worst:.3g})"
                                                       if differ else "")
    return ctx.check(cid, not differ, measured, f"bitwise equal to {what}")


# ---- correctness ----------------------------------------------------------------------------
def check_precision(ctx):
    # these runs of a few steps stay in this process on the device too: a child's start-up
    # (Python, torch, CUDA) would cost more than the run
    s = ctx.size
    for fam, model_argv in (("ldae", s["ldae"]), ("dit", s["dit"])):
        base = short_argv(ctx, model_argv, steps=s["steps"])
        w0 = initial_weights(ctx, model_argv)
        bf16 = train(ctx, f"{fam}_bf16", [*base, "--precision", "bf16"], child=False)
        fp32 = train(ctx, f"{fam}_fp32", [*base, "--precision", "fp32"], child=False)
        loss_rel, upd = agreement(bf16, fp32, w0, s["steps"])
        # identical runs would mean autocast never engaged: bf16 must differ a little
        ran = loss_rel > 0 or upd > 0
        ok = ran and loss_rel <= TOL["loss_rel"] and upd <= TOL["update_rel"]
        ctx.check(f"precision.{fam}", ok, f"{model_argv[1]}, {s['steps']} steps: loss rel "
                  f"{loss_rel:.2e}, update rel {upd:.3f}",
                  f"0 < loss rel <= {TOL['loss_rel']}, update rel <= {TOL['update_rel']}",
                  "fp32 = TF32 matmuls on CUDA" if ctx.cuda else "CPU autocast bf16")


def default_precision(ctx):
    return "bf16" if ctx.cuda else "fp32"


def check_compile(ctx):
    s = ctx.size
    prec = ["--precision", default_precision(ctx)]
    base = short_argv(ctx, s["ldae"], steps=s["steps"], extra=prec)
    w0 = initial_weights(ctx, s["ldae"])
    eager = train(ctx, f"ldae_{default_precision(ctx)}", base)
    compiled = train(ctx, "ldae_compile", [*base, "--compile"], timeout=400)
    loss_rel, upd = agreement(compiled, eager, w0, s["steps"])
    ok = loss_rel <= TOL["loss_rel"] and upd <= TOL["update_rel"]
    note = "inductor" if not ctx.dry else "dry run: dynamo with the eager backend"
    ctx.check("compile", ok, f"{s['ldae'][1]} {default_precision(ctx)}, {s['steps']} steps: loss "
              f"rel {loss_rel:.2e}, update rel {upd:.3f}",
              f"loss rel <= {TOL['loss_rel']}, update rel <= {TOL['update_rel']}", note)


def check_fused_adamw(ctx):
    s = ctx.size
    prec = ["--precision", default_precision(ctx)]
    base = short_argv(ctx, s["ldae"], steps=s["steps"], extra=prec)
    run = train(ctx, f"ldae_{default_precision(ctx)}", base)
    groups = checkpoint(run)["optimizer"]["param_groups"]
    fused = sorted({bool(g.get("fused")) for g in groups})
    ctx.check("fused_adamw.engine", fused == [ctx.cuda], f"the run's AdamW fused = {fused}",
              f"fused exactly when on CUDA ({ctx.cuda})")
    rel = fused_vs_reference(ctx, s["ldae"][1])
    ctx.check("fused_adamw.numerics", rel <= TOL["fused_rel"], f"max |diff| / max |update| "
              f"{rel:.2e} after 5 steps on {s['ldae'][1]}'s parameters", f"<= {TOL['fused_rel']}")


def fused_vs_reference(ctx, model_name):
    """Fused AdamW vs the single-tensor loop on the same gradients, on the device."""
    torch.manual_seed(0)
    params = [p.detach().to(ctx.device) for p in registry.build_model(model_name).parameters()]
    start = [p.clone() for p in params]
    fused = [p.clone().requires_grad_() for p in params]
    loop = [p.clone().requires_grad_() for p in params]
    opts = [torch.optim.AdamW(fused, lr=1e-3, weight_decay=0.05, fused=True),
            torch.optim.AdamW(loop, lr=1e-3, weight_decay=0.05, foreach=False)]
    g = torch.Generator(ctx.device).manual_seed(0)
    for _ in range(5):
        for a, b in zip(fused, loop):
            a.grad = torch.randn(a.shape, generator=g, device=ctx.device) * 1e-2
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(fused, loop))
    update = max((b - p).abs().max().item() for b, p in zip(loop, start))
    return diff / max(update, 1e-30)


def start_torchrun(ctx):
    """torchrun --nproc_per_node=1 pretrain.py with resume_argv -> (child, its output folder)."""
    out = ctx.fresh("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "pretrain.py", *resume_argv(ctx), "--output-dir", out]
    return spawn(ctx, cmd, "torchrun"), out


def check_torchrun(ctx):
    argv = resume_argv(ctx)
    proc, out = ctx.early.pop("torchrun", None) or start_torchrun(ctx)
    plain = train(ctx, "plain", argv)
    timeout = min(180, ctx.left() + 30)
    child_result("torchrun pretrain.py", *finish(ctx, proc, timeout), timeout)
    same = logged_losses(plain) == logged_losses(out)
    rec = bitwise(ctx, "torchrun", os.path.join(plain, "checkpoint.pt"),
                  os.path.join(out, "checkpoint.pt"), "the plain process")
    rec["note"] = (f"losses {'identical' if same else 'DIFFER'}; 1 rank: WORLD_SIZE=1, no "
                   "process group")
    if rec["status"] != "pass":
        rec["note"] += "; " + determinism(ctx, argv, plain)


def determinism(ctx, argv, plain):
    """When a bitwise check fails: does the same run, repeated, reproduce itself?"""
    again = ctx.fresh("plain_again")
    run_script(ctx, "pretrain.py", [*argv, "--output-dir", again], min(180, ctx.left() + 30))
    n, differ, worst = compare_checkpoints(os.path.join(plain, "checkpoint.pt"),
                                           os.path.join(again, "checkpoint.pt"))
    if not differ:
        return "the same run repeated IS bitwise reproducible, so the difference is real"
    return (f"the same run repeated differs too ({len(differ)} of {n} tensors, max {worst:.3g}): "
            f"the device's kernels are not run-to-run deterministic")


def check_nccl(ctx):
    """A world-1 process group on the backend distributed.setup_distributed picks (NCCL on CUDA):
    all_reduce, and one DDP(LossModule) backward equal to the plain module's, bitwise.
    (One GPU cannot host two NCCL ranks, so pretrain's own DDP path, world > 1, cannot run here.)
    On the device in a child process: a hung NCCL init is killed after 120 s."""
    backend = "nccl" if ctx.cuda else "gloo"
    store = os.path.join(ctx.work, "pg_store")
    model = ctx.size["ldae"][1]
    if ctx.isolate:
        code = (f"import json, sys; sys.path.insert(0, 'tools'); import gpu_check; print(json."
                f"dumps(gpu_check.process_group_check({backend!r}, {store!r}, {model!r})))")
        proc = spawn(ctx, [sys.executable, "-c", code], "nccl")
        res = child_result("the process-group check", *finish(ctx, proc, 120), 120)
    else:
        with quiet(ctx):
            res = process_group_check(backend, store, model)
    ok = res["all_reduce"] and res["ddp_grads_equal"]
    ctx.check("nccl", ok, f"{backend}: all_reduce {'ok' if res['all_reduce'] else 'WRONG'}, DDP "
              f"gradients {'equal' if res['ddp_grads_equal'] else 'DIFFER'}", "bitwise equal")


def process_group_check(backend, store, model_name):
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)
        reduced = torch.equal(t, torch.arange(4.0, device=device))
        grads_equal = ddp_matches_plain(model_name, device)
    finally:
        dist.destroy_process_group()
    return {"all_reduce": reduced, "ddp_grads_equal": grads_equal}


def ddp_matches_plain(model_name, device):
    torch.manual_seed(0)
    model = registry.build_model(model_name).to(device)
    model.init_weights(active=True)
    plain = LossModule(model)
    ids = [device] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(LossModule(model), device_ids=ids)
    S = model.config["img_size"]
    x = torch.rand(8, 3, S, S, device=device) * 2 - 1
    y = torch.zeros(8, dtype=torch.long, device=device)
    grads = []
    for fn in (plain, wrapped):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        fn(x, y).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return len(grads[0]) == len(grads[1]) and all(map(torch.equal, *grads))


def check_resume(ctx):
    argv = resume_argv(ctx)
    plain = train(ctx, "plain", argv)
    out = ctx.fresh("resumed")
    proc = spawn(ctx, [sys.executable, "pretrain.py", *argv, "--output-dir", out], "killed")
    # the epoch file is written first and checkpoint.pt linked to it: wait for the link
    first, deadline = os.path.join(out, "checkpoint.pt"), time.time() + min(180, ctx.left())
    while proc.poll() is None and not os.path.exists(first) and time.time() < deadline:
        time.sleep(0.01)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    rc, _, _ = finish(ctx, proc, 30)
    stop = ctx.size["synth"] // ctx.size["batch"] * ctx.size["resume_epochs"]
    at_kill = None
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        at_kill = checkpoint(out)["step"]
    if not alive or at_kill is None or at_kill >= stop:
        raise RunError(f"the run was not interrupted mid-way (exit code {rc}, checkpoint step "
                       f"{at_kill} of {stop}): nothing to resume")
    run_script(ctx, "pretrain.py", [*argv, "--output-dir", out, "--resume", "auto"],
               min(180, ctx.left() + 30))
    rec = bitwise(ctx, "resume", os.path.join(plain, "checkpoint.pt"),
                  os.path.join(out, "checkpoint.pt"), "the uninterrupted run")
    rec["note"] = f"SIGKILL at step {at_kill} of {stop} (exit code {rc}), then --resume auto"
    if rec["status"] != "pass":
        rec["note"] += "; " + determinism(ctx, argv, plain)


def check_decode(ctx):
    s = ctx.size
    folder = os.path.join(ctx.work, "jpegs")
    with quiet(ctx):
        pack_data.write_jpeg_folder(folder, s["jpegs"], size=s["jpeg_size"])
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    raw = [decode.read_bytes(f) for f in files]
    seeds = list(range(len(files)))
    worst_mean, worst_p999, rows = 0.0, 0.0, []
    for kind in ("center", "eval", "rrc"):
        decode.decode_batch(raw, s["decode_px"], kind, ctx.device, seeds=seeds)      # warm-up
        sync(ctx)
        t = time.perf_counter()
        x = decode.decode_batch(raw, s["decode_px"], kind, ctx.device, seeds=seeds)
        sync(ctx)
        ips = len(raw) / (time.perf_counter() - t)
        d = (x.cpu() - pil_reference(files, kind, s["decode_px"], seeds)).abs().flatten()
        p999 = d.kthvalue(max(1, math.ceil(0.999 * d.numel()))).values.item()
        rows.append(f"{kind} mean {d.mean().item():.4f} p99.9 {p999:.3f} max {d.max().item():.3f}"
                    f" ({ips:.0f} img/s)")
        worst_mean, worst_p999 = max(worst_mean, d.mean().item()), max(worst_p999, p999)
    ok = worst_mean <= TOL["decode_mean"] and worst_p999 <= TOL["decode_p999"]
    ctx.check("decode.vs_pil", ok, f"{len(files)} JPEGs {s['jpeg_size'][0]}x{s['jpeg_size'][1]} "
              f"-> {s['decode_px']} px on {ctx.device.type}: " + "; ".join(rows),
              f"mean <= {TOL['decode_mean']}, p99.9 <= {TOL['decode_p999']} ([-1, 1] units)")
    decode_training_run(ctx, folder)


def pil_reference(files, kind, size, seeds):
    """The DataLoader path: PIL decode + transforms.build_transform, seeded as decode_batch is."""
    from PIL import Image
    tf, out = transforms.build_transform(kind, size), []
    for f, seed in zip(files, seeds):
        torch.manual_seed(seed)
        with Image.open(f) as img:
            out.append(tf(img))
    return torch.stack(out)


def decode_training_run(ctx, folder):
    s = ctx.size
    argv = [*s["decode_run"], "--dataset", "imagefolder", "--data-path", folder, "--decode", "gpu",
            "--aug", "rrc", "--batch-size", str(s["decode_batch"]), "--epochs", "1",
            "--max-steps", "3", "--warmup-epochs", "0", "--lr", "1e-3", "--pca-images", "8",
            "--num-workers", str(s["workers"]), "--log-every", "1", "--output-dir",
            ctx.fresh("decode_gpu")]
    # a run of 3 steps: in this process, as the precision runs
    res = run_script(ctx, "pretrain.py", argv, min(180, ctx.left() + 30), child=False)
    ck = registry.load(res["checkpoint"])
    ok = res["steps"] == 3 and math.isfinite(res["final_loss"]) and ck["args"]["decode"] == "gpu"
    ctx.check("decode.training", ok, f"pretrain.py --decode gpu: {res['steps']} steps, final loss "
              f"{res['final_loss']:.4f}", "3 steps, finite loss, checkpoint says decode gpu")


def sync(ctx):
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


# ---- speed ----------------------------------------------------------------------------------
def check_gemm(ctx):
    n = ctx.size["gemm"]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(ctx)
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(ctx)
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    ctx.results["gemm"] = {"n": n, "dtype": str(dtype).split(".")[1],
                           "tflops": float(f"{tflops:.4g}")}
    ctx.check("gemm", tflops > 0, f"{n}^3 {ctx.results['gemm']['dtype']} matmul: {tflops:.3g} "
              "TFLOP/s (mean of 10 after 3 warm-ups)", "runs")


def check_benchmark(ctx, model, batch, compile_):
    s = ctx.size
    argv = ["--model", model, "--steps", str(s["bench_steps"]), "--batch-size", str(batch),
            "--input-size", str(s["bench_px"])]
    if compile_:
        argv.append("--compile")
    timeout = min(420 if compile_ else 150, ctx.left() + 30)
    try:
        res = run_script(ctx, "tools/bench_train.py", argv, timeout)
    except (RunError, torch.OutOfMemoryError) as e:
        if "out of memory" not in f"{e} {getattr(e, 'text', '')}".lower():
            raise
        ctx.say(f"{model}: out of memory at batch {batch}; again with --grad-checkpoint")
        argv.append("--grad-checkpoint")
        res = run_script(ctx, "tools/bench_train.py", argv, min(timeout, ctx.left() + 30))
    row = {**res, "grad_checkpoint": "--grad-checkpoint" in argv,
           "command": "python tools/bench_train.py " + " ".join(argv)}
    ctx.results["benchmarks"].append(row)
    mfu = f", MFU {res['mfu']:.1%}" if res["mfu"] is not None else ""
    ctx.check(f"speed_{'compile' if compile_ else 'eager'}.{model}", res["img_per_s"] > 0,
              f"{res['img_per_s']:.1f} img/s, {res['tflops_per_device']:.3g} TFLOP/s{mfu}",
              "runs to the end", "figures in the Speed table")


def check_features(ctx):
    """The cached probe's feature pass (features.make_featurizer: bf16 autocast on CUDA, under
    inference_mode as features.extract runs it) on random images vs the training step's img/s."""
    s = ctx.size
    name = s["bench"][0][0]
    with quiet(ctx):
        model = registry.build_model(name, img_size=s["bench_px"]).to(ctx.device).eval()
        keys = [(model.depth // 2, model.probe_t, False)]
        featurize = features.make_featurizer(model, keys, argparse.Namespace(
            compile=False, clean_input="projected"))
        x = torch.rand(s["feat_batch"], 3, s["bench_px"], s["bench_px"], device=ctx.device) * 2 - 1
        with torch.inference_mode():
            for _ in range(3):
                featurize(x)
            sync(ctx)
            t = time.perf_counter()
            for _ in range(s["feat_iters"]):
                featurize(x)
            sync(ctx)
        ips = s["feat_iters"] * s["feat_batch"] / (time.perf_counter() - t)
        del model, x
        release(ctx)
    train_ips = next((b["img_per_s"] for b in ctx.results["benchmarks"]
                      if b["model"] == name and not b["compile"]), None)
    ratio = ips / train_ips if train_ips else None
    ctx.results["features"] = {"model": name, "img_size": s["bench_px"], "batch": s["feat_batch"],
                               "img_per_s": round(ips, 1), "train_img_per_s": train_ips,
                               "ratio": ratio and round(ratio, 2)}
    versus = f", {ratio:.1f}x the eager training step" if ratio else " (no training figure)"
    ctx.check("features", ips > 0, f"{name} probe feature pass: {ips:.0f} img/s{versus}", "runs",
              "forward of half the blocks: ~6x fewer FLOPs than a training step")


def release(ctx):
    if ctx.cuda:
        torch.cuda.empty_cache()


def check_profile(ctx):
    """torch.profiler over a few eager vit_b training steps (Engine, the step tools/bench_train.py
    times): device time by kernel kind, how busy the device is, matmul efficiency."""
    s = ctx.size
    name, batch = s["bench"][0]
    args = pretrain.get_args_parser().parse_args(["--model", name, "--batch-size", str(batch),
                                                  "--input-size", str(s["bench_px"])])
    with quiet(ctx):
        torch.manual_seed(0)
        model = registry.build_model(name, None, **pretrain.model_overrides(args)).to(ctx.device)
        engine = Engine(model, args, 0, 1, ctx.device)
        px = s["bench_px"]
        x = torch.rand(batch, 3, px, px, device=ctx.device) * 2 - 1
        micro = [(x, torch.zeros(batch, dtype=torch.long, device=ctx.device))]
        for i in range(3):
            engine.step(micro, i, 1e-4)
        sync(ctx)
        kinds = [torch.profiler.ProfilerActivity.CPU]
        if ctx.cuda:
            kinds.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=kinds) as prof:
            t = time.perf_counter()
            for i in range(s["prof_steps"]):
                engine.step(micro, 3 + i, 1e-4)
            sync(ctx)
            wall = (time.perf_counter() - t) / s["prof_steps"]
        flops = bench_train.train_flops_per_image(model) * batch
        del model, engine, x, micro
        release(ctx)
    prof_res = summarize_profile(ctx, prof.key_averages(), wall, flops, s["prof_steps"])
    prof_res.update(model=name, batch=batch, img_size=s["bench_px"])
    ctx.results["profile"] = prof_res
    ctx.check("profile", prof_res["busy_ms"] > 0, prof_res["verdict"], "runs")


# kernel / op name fragments -> kind (first match wins; lower case)
KINDS = [("matmul", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "aten::mm", "aten::addmm",
                     "aten::bmm", "aten::linear", "convolution")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ("optimizer + EMA", ("adam", "multi_tensor", "foreach", "lerp")),
         ("layer norm", ("layer_norm", "layernorm")),
         ("copies / casts", ("copy", "cast", "to_copy", "fill", "cat")),
         ("other elementwise / reductions", ("",))]


def summarize_profile(ctx, events, wall_s, flops, steps):
    by_kind = dict.fromkeys([k for k, _ in KINDS], 0.0)
    for e in events:
        if ctx.cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not ctx.cuda and not e.key.startswith("aten::"):
            continue
        us = e.self_device_time_total if ctx.cuda else e.self_cpu_time_total
        key = e.key.lower()
        kind = next(k for k, frags in KINDS if any(f in key for f in frags))
        by_kind[kind] += us / 1e3 / steps
    busy = sum(by_kind.values())
    wall_ms = wall_s * 1e3
    mm = by_kind["matmul"] + by_kind["attention"]
    mm_tflops = flops / (mm / 1e3) / 1e12 if mm else 0.0
    idle = max(0.0, 1 - busy / wall_ms)
    if ctx.cuda and busy == 0:
        verdict = "no CUDA kernel events were recorded (is CUPTI available?)"
    elif ctx.cuda and idle > 0.15:
        verdict = f"host-bound: the GPU idles {idle:.0%} of the step (launch / Python overhead)"
    elif mm < 0.6 * busy:
        verdict = f"non-matmul kernels take {1 - mm / max(busy, 1e-9):.0%} of the device time"
    else:
        verdict = f"matmul-bound: matmul + attention kernels {mm / max(busy, 1e-9):.0%} of the time"
    verdict += f"; model FLOPs / matmul+attention time = {mm_tflops:.3g} TFLOP/s"
    return {"wall_ms": round(wall_ms, 2), "busy_ms": round(busy, 2), "idle": round(idle, 3),
            "by_kind_ms": {k: round(v, 2) for k, v in by_kind.items()},
            "matmul_tflops": float(f"{mm_tflops:.4g}"), "verdict": verdict,
            "device_time": "CUDA kernels" if ctx.cuda else "CPU aten ops (self time)"}


# ---- learning -------------------------------------------------------------------------------
def learn_argv(ctx):
    s, a = ctx.size, ctx.args
    model = a.learn_model if not ctx.dry else "vit_tiny"
    argv = ["--model", model, *s["learn_data"], *fmnist_path(ctx), *s["learn_px"],
            "--batch-size", s["learn_batch"],
            "--lr", 4e-3, "--ema", 0.999, "--pca-images", 2000 if not ctx.dry else 64,
            "--num-workers", s["learn_workers"], "--save-every", 1, "--grid-every", 1000,
            "--log-every", 100 if not ctx.dry else 1, "--seed", a.seed]
    if ctx.dry:
        argv += ["--epochs", 1, "--warmup-epochs", 0.25]
    else:
        argv += ["--epochs", a.learn_epochs, "--warmup-epochs", 1]
    return [str(v) for v in argv]


def fmnist_path(ctx):
    return [] if ctx.dry else ["--data-path", ctx.args.fashion_mnist]


# Learning runs in three steps, so that the device never idles for it and never shares its time
# with a timed benchmark: training starts first and runs beside the correctness checks (whose
# timings are no claims), the probes run beside the compile check, then the speed table runs alone.
def check_learning_start(ctx):
    """l-DAE and a pixel DAE (d = D = 48, no latent normalisation) started side by side, each for
    up to --learn-s seconds (a run still going then is stopped; its newest epoch checkpoint
    counts)."""
    if not ctx.dry and ctx.args.fashion_mnist is None:
        return ctx.skip("learning", "no Fashion-MNIST: pass --fashion-mnist DIR (the 4 gz files)")
    argv = learn_argv(ctx)
    jobs = {"ldae": argv, "pixel_dae": [*argv, "--latent-dim", "48", "--latent-norm", "none"]}
    outs = {k: ctx.fresh(f"learn_{k}") for k in jobs}
    ctx.say(f"learning: training {', '.join(jobs)} for up to {ctx.args.learn_s:.0f} s"
            + (" in the background" if ctx.isolate else ""))
    handle = start_jobs(ctx, "pretrain.py", {k: [*v, "--output-dir", outs[k]]
                                             for k, v in jobs.items()}, ctx.args.learn_s)
    ctx.memo["learning"] = {"jobs": jobs, "outs": outs, "train": handle}


def check_learning_train(ctx):
    """The training runs, collected (a checkpoint each, finite losses); the probes started: the
    l-DAE with --compare (learned, random init, raw pixels), the pixel DAE alone."""
    state = ctx.memo.get("learning")
    if state is None:                            # not started: its skip is recorded
        return
    trained = join_jobs(ctx, state["train"])
    runs = {k: learned_run(state["outs"][k], *trained[k]) for k in state["jobs"]}
    state["runs"] = runs
    ok = all(math.isfinite(r["last_loss"]) for r in runs.values())
    ctx.check("learning.train", ok, "; ".join(
        f"{k}: {r['steps']} steps, {r['epochs_done']} epochs, {r['how']}, last loss "
        f"{r['last_loss']:.4f}" for k, r in runs.items()), "a checkpoint each, finite losses")
    probe = [*learn_probe_data(ctx), *ctx.size["probe_extra"]]
    state["probe_argv"] = probe
    state["probes"] = start_jobs(ctx, "linprobe.py", {
        "ldae": [runs["ldae"]["checkpoint"], "--protocol", "cached", "--compare", *probe,
                 "--output-dir", ctx.fresh("probe_ldae")],
        "pixel_dae": [runs["pixel_dae"]["checkpoint"], "--protocol", "cached", *probe,
                      "--output-dir", ctx.fresh("probe_pixel_dae")]}, max(60, min(240, ctx.left())))


def check_learning(ctx):
    """The probes, collected: learned vs random init vs pixel DAE vs raw pixels."""
    state = ctx.memo.get("learning", {})
    if "probes" not in state:                    # an earlier step did not get here: recorded
        return
    probes = join_jobs(ctx, state["probes"])
    for k, (res, err, _) in probes.items():
        if err:
            raise RunError(f"probe of {k}: {err}")
    lres, pres = probes["ldae"][0], probes["pixel_dae"][0]
    rows = [("l-DAE", lres["top1"], lres["top5"]),
            ("random init (active blocks)", lres["random_init_top1"], lres["random_init_top5"]),
            ("pixel DAE (d = 48, no latent norm)", pres["top1"], pres["top5"]),
            ("raw pixels", lres["pixels_top1"], lres["pixels_top5"])]
    ctx.results["learning"] = {
        "train_commands": [f"python pretrain.py {' '.join(v)} --output-dir OUT_{k}"
                           for k, v in state["jobs"].items()],
        "probe_command": f"python linprobe.py OUT_ldae/checkpoint.pt --protocol cached --compare "
                         f"{' '.join(state['probe_argv'])}", "train_s": ctx.args.learn_s,
        "runs": state["runs"],
        "rows": [{"features": f, "top1": t1, "top5": t5} for f, t1, t5 in rows]}
    ok = all(math.isfinite(t1) for _, t1, _ in rows)
    ctx.check("learning", ok, "; ".join(f"{f} {t1:.2f}" for f, t1, _ in rows),
              "runs; the figures are measurements", "cached probe, top-1 %")


def learned_run(out, res, err, timed_out):
    """A training run that finished, or was stopped at the time limit: its newest checkpoint."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        raise RunError(f"training in {out} left no checkpoint ({err or 'no error'})")
    if err and not timed_out:
        raise RunError(f"training in {out} failed: {err}")
    ck = registry.load(path)
    how = "stopped at the time limit" if timed_out else "finished"
    return {"checkpoint": path, "steps": ck["step"], "epochs_done": ck["epoch"], "how": how,
            "last_loss": logged_losses(out)[-1]}


def learn_probe_data(ctx):
    return [*ctx.size["learn_data"], *fmnist_path(ctx)]


# ---- the plan, the report, main --------------------------------------------------------------
def plan(ctx):
    """(check id, estimated seconds, function) in the order they run: learning's training in the
    background, every correctness check, the probes beside the compile check, then, with the
    device to itself, the speed table: eager, vit_b compiled, the feature pass, the profile, and
    the other compiled benchmarks (the longest compiles) as long as the budget lasts."""
    col = 1 if ctx.dry else 0
    est = {k: v[col] for k, v in EST.items()}
    bench = ctx.size["bench"]

    def benchmark(model, batch, compile_):
        cost = BENCH_EST.get(model, (3, 8))[compile_] if not ctx.dry else 3 + 5 * compile_
        task = functools.partial(check_benchmark, model=model, batch=batch, compile_=compile_)
        return f"speed_{'compile' if compile_ else 'eager'}.{model}", cost, task

    steps = ["learning.start", "precision", "fused_adamw", "torchrun", "nccl", "resume", "decode",
             "learning.train", "compile", "learning", "gemm"]
    tasks = [(c, est[c], globals()[f"check_{c.replace('.', '_')}"]) for c in steps]
    tasks += [benchmark(m, b, False) for m, b in bench] + [benchmark(*bench[0], True)]
    tasks += [("features", est["features"], check_features),
              ("profile", est["profile"], check_profile)]
    return tasks + [benchmark(m, b, True) for m, b in bench[1:]]


def selected(task_id, only):
    return not only or any(task_id == o or task_id.split(".")[0] == o or
                           task_id.split(".")[0] in SECTIONS.get(o, ()) for o in only)


def run_plan(ctx):
    only = ctx.args.only
    # the dry run (CI's 2 cores, this process on 1 thread) starts the torchrun child first: its
    # start-up and run take the second core while the checks before it run here
    if ctx.dry and selected("torchrun", only):
        ctx.early["torchrun"] = start_torchrun(ctx)
    for cid, est, fn in plan(ctx):
        if not selected(cid, only):
            continue
        if est > ctx.left():
            ctx.skip(cid, f"needs ~{est} s, {max(0, ctx.left()):.0f} s of --budget-s left")
            ctx.save()
            continue
        ctx.log(f"\n===== {cid} =====")
        t = time.time()
        n = len(ctx.results["checks"])
        try:
            fn(ctx)
        except Exception as e:     # any failure is this check's, recorded; the run goes on
            ctx.log(traceback.format_exc())
            msg = f"{type(e).__name__}: {str(e)[:300]}"
            ctx.record(cid, "error", msg, "-", "traceback in log.txt")
        for rec in ctx.results["checks"][n:]:
            rec["seconds"] = round(time.time() - t, 1)
        release(ctx)
        ctx.save()
    for proc, _ in ctx.early.values():           # started early, its check skipped: stop it
        finish(ctx, proc, 0)


def report(res):
    m, checks = res["meta"], res["checks"]
    count = {s: sum(c["status"] == s for c in checks) for s in ("pass", "fail", "error")}
    head = [f"# GPU check: {m['device']}{' (DRY RUN on CPU: tiny sizes)' if m['dry_run'] else ''}",
            "", f"{m['date']}; torch {m['torch']} (CUDA {m['cuda']}), torchvision "
            f"{m['torchvision']}, Python {m['python']}, {m['cpus']} CPUs; commit {m['commit']}"]
    if "gpu_mem_gib" in m:
        head.append(f"GPU: {m['device']}, {m['gpu_mem_gib']} GiB, compute capability "
                    f"{m['capability']}, driver {m['driver']}, cuDNN {m['cudnn']}")
    head += [f"Command: `python {m['command']}` ({m.get('seconds', 0):.0f} s of a "
             f"{m['budget_s']:.0f} s budget)", "",
             f"**{count['pass']} passed, {count['fail']} failed, {count['error']} errors, "
             f"{len(res['skipped'])} skipped.** Tracebacks and every run's output: log.txt.", ""]
    return "\n".join(head + checks_md(res) + speed_md(res) + learning_md(res)
                     + skipped_md(res)) + "\n"


def checks_md(res):
    out = []
    for section, title in (("correctness", "1. Correctness"), ("speed", "2. Speed"),
                           ("learning", "3. Learning")):
        rows = [c for c in res["checks"] if c["section"] == section]
        if not rows:
            continue
        out += [f"## {title}", "", "| check | result | measured | tolerance | note | s |",
                "|---|---|---|---|---|---|"]
        out += [f"| {c['id']} | **{c['status'].upper()}** | {c['measured']} | {c['tolerance']} | "
                f"{c['note']} | {c['seconds']} |" for c in rows]
        out.append("")
    return out


def speed_md(res):
    rows = res["benchmarks"]
    if not rows:
        return []
    gemm = res["gemm"]
    out = ["## Speed table", ""]
    if gemm:
        out += [f"Measured ceiling: {gemm['n']}^3 {gemm['dtype']} matmul {gemm['tflops']} TFLOP/s "
                "(MFU below is against the spec peak in bench_train.PEAK_TFLOPS).", ""]
    out += ["| model | px | batch | compile | grad ckpt | precision | img/s | TFLOP/s | MFU | "
            "of measured matmul | peak mem GiB | step s |", "|" + "---|" * 12]
    for b in rows:
        mfu = f"{b['mfu']:.1%}" if b["mfu"] is not None else "n/a"
        of_gemm = "-"
        if gemm and gemm["tflops"]:
            of_gemm = f"{b['tflops_per_device'] / gemm['tflops']:.1%}"
        out.append(f"| {b['model']} | {b['img_size']} | {b['global_batch']} | {b['compile']} | "
                   f"{b['grad_checkpoint']} | {b['precision']} | {b['img_per_s']} | "
                   f"{b['tflops_per_device']} | {mfu} | {of_gemm} | {b['peak_mem_gb']} | "
                   f"{b['step_s']} |")
    out += ["", "Commands:", ""] + [f"- `{b['command']}`" for b in rows] + [""]
    out += mfu_md(res) + features_md(res) + profile_md(res)
    return out


def mfu_md(res):
    vit_b = [b for b in res["benchmarks"] if b["model"] == "vit_b" and b["mfu"] is not None]
    if not vit_b:
        return ["MFU target (vit_b >= 50%): not measured in this run.", ""]
    best = max(vit_b, key=lambda b: b["mfu"])
    met = "MET" if best["mfu"] >= TOL["mfu_target"] else "SHORT (the profile below says why)"
    how = "compiled" if best["compile"] else "eager"
    return [f"MFU target: vit_b best {best['mfu']:.1%} ({how}, {best['img_per_s']} img/s) vs "
            f">= {TOL['mfu_target']:.0%}: **{met}**.", ""]


def features_md(res):
    f = res["features"]
    if not f:
        return []
    ratio = f"{f['ratio']}x the eager training step ({f['train_img_per_s']} img/s)" \
        if f["ratio"] else "no training figure to compare"
    return [f"Cached-probe feature pass ({f['model']}, {f['img_size']} px, batch {f['batch']}, "
            f"features.make_featurizer): {f['img_per_s']} img/s, {ratio}.", ""]


def profile_md(res):
    p = res["profile"]
    if not p:
        return []
    out = [f"Profile of {p['model']} (batch {p['batch']}, {p['img_size']} px, eager): step "
           f"{p['wall_ms']} ms wall, {p['busy_ms']} ms of {p['device_time']}. {p['verdict']}.", "",
           "| kind | ms / step | share |", "|---|---|---|"]
    for k, v in p["by_kind_ms"].items():
        out.append(f"| {k} | {v} | {v / max(p['busy_ms'], 1e-9):.1%} |")
    return out + [""]


def learning_md(res):
    lr = res["learning"]
    if not lr:
        return []
    out = ["## Learning", "", "| features | top-1 | top-5 |", "|---|---|---|"]
    out += [f"| {r['features']} | {r['top1']:.2f} | {r['top5']:.2f} |" for r in lr["rows"]]
    out += ["", f"Training: up to {lr['train_s']} s each, side by side; "
            + "; ".join(f"{k}: {r['steps']} steps, {r['epochs_done']} epochs, {r['how']}"
                        for k, r in lr["runs"].items()), "", "Commands:", ""]
    out += [f"- `{c}`" for c in lr["train_commands"]] + [f"- `{lr['probe_command']}` (pixel DAE: "
                                                         "the same without --compare)", ""]
    return out


def skipped_md(res):
    if not res["skipped"]:
        return []
    return ["## Skipped", ""] + [f"- {s['id']}: {s['reason']}" for s in res["skipped"]] + [""]


def check_inputs(args, cuda):
    """Every input checked before any work (house rule): UserError names the problem and the fix."""
    known = set(SECTIONS) | {c for cs in SECTIONS.values() for c in cs}
    bad = [o for o in args.only if o.split(".")[0] not in known]
    if bad:
        raise UserError(f"--only {','.join(bad)}: unknown; choose from {', '.join(sorted(known))} "
                        "(or speed_eager.MODEL / speed_compile.MODEL)")
    if args.fashion_mnist is None and cuda and os.path.isdir(datasets.DEBIAN_FMNIST):
        args.fashion_mnist = datasets.DEBIAN_FMNIST
    if args.fashion_mnist is not None:
        if not os.path.isdir(args.fashion_mnist):
            raise UserError(f"--fashion-mnist {args.fashion_mnist} is not a folder; pass the "
                            "folder holding the 4 Fashion-MNIST *-ubyte.gz files")
        args.fashion_mnist = os.path.abspath(args.fashion_mnist)
        datasets.FashionMNIST(args.fashion_mnist, "val")     # names a missing or broken file
    try:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, ".write_test"), "")
        os.remove(os.path.join(args.out, ".write_test"))
    except OSError as e:
        raise UserError(f"--out {args.out} is not writable ({e.strerror}); pass another folder") \
            from None


def main(args):
    cuda = torch.cuda.is_available()
    dry = args.dry_run or not cuda
    if args.budget_s is None:
        args.budget_s = 450.0 if not dry else 300.0
    check_inputs(args, cuda)
    device = torch.device("cuda", 0) if not dry else torch.device("cpu")
    ctx = Session(args, device, dry)
    why = "forced by --dry-run" if args.dry_run else "no CUDA device"
    where = f"DRY RUN ({why}): tiny sizes on CPU" if dry else ctx.results["meta"]["device"]
    ctx.say(f"{where}; budget {args.budget_s:.0f} s; out {args.out}; work {ctx.work}; only "
            f"{','.join(args.only) or 'all'}; torch {torch.__version__}")
    try:
        run_plan(ctx)
    finally:
        ctx.save()
        ctx.logf.close()
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(ctx.work, ignore_errors=True)
    checks = ctx.results["checks"]
    failed = [c["id"] for c in checks if c["status"] != "pass"]
    print(f"[gpu_check] {len(checks) - len(failed)} of {len(checks)} checks passed"
          + (f", failed: {', '.join(failed)}" if failed else "")
          + f"; {len(ctx.results['skipped'])} skipped; "
          f"{ctx.results['meta']['seconds']:.0f} s. Report: {os.path.join(args.out, 'report.md')}",
          flush=True)
    return ctx.results


def get_args_parser():
    p = cli.ArgumentParser(prog="tools/gpu_check.py", description="Verify the project on a CUDA "
                           "machine in one run (or its dry run on CPU); see the module docstring.")
    p.add_argument("--out", required=True, help="folder for report.md, results.json, log.txt")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on CPU (automatic when there is no CUDA device)")
    p.add_argument("--budget-s", type=cli.bounded(float, 0, low_open=True), default=None,
                   help="total seconds; checks that would not fit are skipped "
                   "(default 450, dry run 300)")
    p.add_argument("--fashion-mnist", default=None,
                   help="folder of the 4 Fashion-MNIST gz files for the learning check (default: "
                   f"{datasets.DEBIAN_FMNIST} if present, else that check is skipped)")
    p.add_argument("--only", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="comma-separated checks or sections (correctness, speed, learning)")
    p.add_argument("--learn-s", type=cli.bounded(float, 0, low_open=True), default=90,
                   help="learning: seconds of training")
    p.add_argument("--learn-model", default="vit_small",
                   help="learning: a 32 px l-DAE size (vit_tiny, vit_small)")
    p.add_argument("--learn-epochs", type=cli.bounded(float, 0, low_open=True), default=10,
                   help="learning: the schedule's length (the run stops at --learn-s anyway)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="the runs' --seed")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, "
                   "removed at the end); checkpoints and JPEGs go here, never into --out")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    return p


if __name__ == "__main__":
    result = cli.run_cli(main, get_args_parser())
    sys.exit(0 if result["ok"] else 1)
