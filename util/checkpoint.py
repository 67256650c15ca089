"""A training run's files (checkpoint.pt, checkpoint-EPOCH.pt, log.jsonl) and bookkeeping (Run)."""
import contextlib
import json
import math
import os
import shutil
import signal
import time

import torch

from util import cli, datasets, distributed, files, lr_sched
from util.cli import UserError, flag
from util.engine import Diverged

# What --resume may change: nothing here alters the data order, the schedule or the model
RESUME_MAY_CHANGE = ("max_steps", "save_every", "log_every", "grid_every", "num_workers", "compile",
                     "precision", "resume", "overwrite", "output_dir", "download", "pca",
                     "pca_images", "pca_center", "preset", "synthetic_val_size", "accum_iter")
RUN_FILES = ("checkpoint", "pca.pt", "log.jsonl", "grid", "student.pt")   # a run's OUTPUT_DIR files
# What a checkpoint of this project holds, by type (load_checkpoint checks each one present)
FIELDS = {"model": dict, "model_config": dict, "step": int, "args": dict, "ema": (dict, type(None)),
          "pca": (dict, type(None)), "optimizer": dict, "rng": dict}
RESUMABLE = ("model", "model_config", "step", "args", "optimizer", "rng")   # --resume reads


def run_files(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith(RUN_FILES)
                  and not name.endswith(".tmp"))


def load_weights(model, state_dict, what="checkpoint"):
    """load_state_dict, strictly, with a mismatch said in one line instead of a traceback."""
    try:
        res = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:                              # shape mismatches
        raise UserError(f"{what} weights do not fit its model config: {str(e)[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        raise UserError(f"{what} does not match the model: missing keys {res.missing_keys[:8]}, "
                        f"unexpected keys {res.unexpected_keys[:8]}")


def load_checkpoint(path, required=("model", "model_config", "step")):
    """-> the checkpoint, checked (`required` keys, field types, a model family, finite weights)."""
    ckpt = files.load_torch(path, "checkpoint", "pass a checkpoint.pt written by this project")
    problem = files.field_problem(ckpt, {key: FIELDS[key] for key in required}, FIELDS)
    if problem is None and not isinstance(ckpt["model_config"].get("family"), str):
        problem = "its model_config names no model family"
    if problem:
        raise UserError(f"{path} is not a checkpoint of this project ({problem}); pass a "
                        f"checkpoint.pt written by pretrain.py or distill.py")
    broken = files.nonfinite(ckpt["model"]) + files.nonfinite(ckpt.get("ema") or {})
    if broken:
        raise UserError(f"{path} holds NaN or infinite weights ({', '.join(broken[:3])}): the run "
                        f"that wrote it diverged; pass an earlier checkpoint-EPOCH.pt")
    return ckpt


class RunLog:
    """Rank 0's log.jsonl; a resume drops the records past its step (replayed now), one run."""

    def __init__(self, path, active=True, resume=None):
        self.path, self.active = path, active
        if not active:
            return
        kept = []
        if resume is not None and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    with contextlib.suppress(ValueError, AttributeError):   # torn by a kill
                        if json.loads(line).get("step", math.inf) <= resume["step"]:
                            kept.append(line if line.endswith("\n") else line + "\n")
        if resume is not None:
            kept.append(json.dumps(resume) + "\n")
        files.write_lines(path, kept)

    def write(self, record, echo=False):
        if not self.active:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise files.write_error(e, self.path) from None
        if echo:
            print(json.dumps(record), flush=True)


def link_or_copy(src, dst):
    try:
        os.link(src, dst)                          # no second write of a multi-GB file
    except OSError:
        shutil.copyfile(src, dst)


def save_checkpoint(ckpt, latest, kept=None):
    """checkpoint.pt; at kept epoch ends checkpoint-EPOCH.pt, then checkpoint.pt as its hard link:
    a kill between the two leaves the previous save, and the resume writes the kept copy again."""
    if kept is None:
        return files.save_torch(ckpt, latest)
    files.save_torch(ckpt, kept)
    return files.atomic_write(latest, lambda tmp: link_or_copy(kept, tmp), files.nbytes(ckpt))


def resume_source(args, latest, inputs=()):
    """-> the checkpoint this run continues (after a torchrun restart: by itself), or None."""
    folder = os.path.dirname(latest)
    found = [name for name in run_files(folder)
             if os.path.abspath(os.path.join(folder, name)) not in inputs]
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if args.resume is None and restarts > 0 and os.path.isfile(latest):
        print(f"[resume] torchrun restart {restarts}: resuming from {latest}", flush=True)
        return latest
    if args.overwrite and args.resume:
        raise UserError("--overwrite starts over and --resume continues: pass one of them")
    if args.resume == "auto":
        if os.path.isfile(latest):
            return latest
        # a run killed before its first save left nothing to resume: it starts again
        found = [name for name in found if name.startswith("checkpoint")]
    source = args.resume if args.resume not in (None, "auto") else None
    elsewhere = source and os.path.dirname(os.path.abspath(source)) != os.path.abspath(folder)
    if found and not args.overwrite and (source is None or elsewhere):
        how = ("continue it with --resume auto (or --resume FILE of its), start over in another "
               "--output-dir, or pass --overwrite to replace it")
        if elsewhere:
            how = f"resume {source} into its own folder, or into an empty --output-dir"
        raise UserError(f"{folder} holds another run's files ({', '.join(found[:4])}); {how}")
    return source


def check_resume(ckpt, args, world, ignore=(), skip=()):
    """Every flag but RESUME_MAY_CHANGE as saved (`ignore`: compared another way, e.g. via the model
    config; `skip`: not comparable yet) -> the changed safe flags, "--flag old -> new" each."""
    saved, now = ckpt["args"], vars(args)
    keys = [k for k in now if k in saved and k not in ignore and k not in skip]
    wrong = [k for k in keys if k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    problems = [f"the checkpoint was trained with {flag(k)} {saved[k]}, this run asks for "
                f"{now[k]}" for k in wrong]
    layout_then = ckpt.get("world", world) * saved.get("accum_iter", args.accum_iter)
    layout_now = world * args.accum_iter
    if layout_then != layout_now:
        problems.append(f"the checkpoint was trained with world x --accum-iter = {layout_then}, "
                        f"this run has {layout_now} (the micro-batch layout fixes the noise)")
    if problems:
        raise UserError(f"--resume: {'; '.join(problems)}. Pass the same values (a longer run is "
                        f"a new run: the cosine schedule depends on --epochs)")
    return [f"{flag(k)} {saved[k]} -> {now[k]}" for k in keys
            if k in RESUME_MAY_CHANGE and k != "resume" and saved[k] != now[k]]


def open_run(args, is_main, world, ignore, build_train_set, inputs=()):
    """Before any work -> (source, ckpt: None if fresh, train set, changed flags, data identity)."""
    files.check_writable_dir(args.output_dir, "--output-dir")
    if is_main:
        files.lock(args.output_dir)
    kept = {os.path.abspath(path) for path in inputs if path}
    for name in run_files(args.output_dir):
        if os.path.abspath(os.path.join(args.output_dir, name)) in kept and name != "pca.pt":
            raise UserError(f"{os.path.join(args.output_dir, name)} is this run's own input and "
                            f"a file it writes; pass another --output-dir")
    source = resume_source(args, os.path.join(args.output_dir, "checkpoint.pt"), kept)
    if args.overwrite and is_main:              # the old run goes whole: epoch files and grids too
        for name in run_files(args.output_dir):
            if os.path.abspath(os.path.join(args.output_dir, name)) not in kept:
                os.remove(os.path.join(args.output_dir, name))
    ckpt = None
    if source:
        ckpt = load_checkpoint(source, RESUMABLE)
        check_resume(ckpt, args, world, ignore, skip=("batch_size",))   # batch: after the cap
    if is_main:
        stale = files.clean_stale_temps(args.output_dir, RUN_FILES)
        if stale:
            print(f"[train] removed {len(stale)} temporary file(s) a killed run left: "
                  f"{', '.join(stale[:4])}", flush=True)
    train_set = distributed.node_first(build_train_set, world)
    distributed.cap_batch(args, len(train_set), world, is_main)
    data = datasets.identity(train_set)
    changed = []
    if ckpt is not None:
        changed = check_resume(ckpt, args, world, ignore)
        if ckpt.get("data") != data:
            raise UserError(f"--resume: the training data changed since the checkpoint "
                            f"({ckpt.get('data')} then, {data} now: files added, removed or "
                            f"replaced); resume with the data it was trained on")
    return source, ckpt, train_set, changed, data


def restore(engine, ckpt, config, ignore=("grad_checkpoint",)):
    """Load a resumed run's model, EMA, optimizer, CPU RNG -> its step (`ignore`: inert keys)."""
    if ckpt is None:
        return 0
    same = {k: v for k, v in ckpt["model_config"].items() if k not in ignore}
    if same != {k: v for k, v in config.items() if k not in ignore}:
        raise UserError(f"--resume: the checkpoint's model {ckpt['model_config']} differs from "
                        f"this run's {config}; pass the same model flags")
    load_weights(engine.model, ckpt["model"])
    if engine.ema is not None:
        load_weights(engine.ema, ckpt["ema"] or ckpt["model"], "checkpoint EMA")
    engine.opt.load_state_dict(ckpt["optimizer"])
    if engine.scaler is not None and ckpt.get("scaler"):
        engine.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"]


class Run:
    """Steps start..last: log lines, epoch ends (loss, checkpoints), a stop signal, the result."""

    def __init__(self, args, engine, n_train, describe, start, source, changed, data, on_step=None):
        self.args, self.engine, self.describe, self.on_step = args, engine, describe, on_step
        self.data = data                                # the training set's identity
        self.base_lr = lr_sched.scaled_lr(args)        # RECIPE s6: blr x batch / 256
        self.is_main = engine.rank == 0
        self.steps_per_epoch = n_train // args.batch_size      # the last partial batch dropped
        self.last = min(max(1, round(args.epochs * self.steps_per_epoch)),
                        args.max_steps or math.inf)
        self.epochs = math.ceil(self.last / self.steps_per_epoch)
        self.first_epoch = self.epochs if start >= self.last else start // self.steps_per_epoch
        self.latest = os.path.join(args.output_dir, "checkpoint.pt")
        self.step, self.source, self.saved_at, self.final_loss = start, source, None, None
        resume = None
        if source is not None:
            self.saved_at = start
            resume = {"kind": "resume", "step": start, "from": source, "changed": list(changed),
                      "seconds": 0.0}
        self.log = RunLog(os.path.join(args.output_dir, "log.jsonl"), self.is_main, resume)
        self.t_start = time.time()
        self.marks = {"log": (self.t_start, start), "epoch": (self.t_start, start)}
        self.bar = cli.progress(total=self.last, initial=start, disable=not self.is_main,
                                unit="step")

    def lr_fn(self, step):
        """Warmup-cosine lr of `step`; on_step(step) first sets what else follows the step clock."""
        if self.on_step is not None:
            self.on_step(step)
        return lr_sched.lr_at(step, self.steps_per_epoch, self.base_lr, self.args.warmup_epochs,
                              self.args.epochs, self.args.min_lr)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.bar.close()
        if isinstance(error, Diverged):
            kept = ("no checkpoint was written" if self.saved_at is None
                    else f"{self.latest} (step {self.saved_at}) is untouched")
            raise Diverged(f"{error}; stopped without saving: {kept}. Lower --lr/--blr or set "
                           f"--clip-grad") from None

    def settings_lines(self):
        args, engine = self.args, self.engine
        micro = args.batch_size // (engine.world * args.accum_iter)
        steps = f"{self.step} -> {self.last}"
        if args.max_steps:
            steps += f" (--max-steps {args.max_steps})"
        ema = f"{args.ema:g}" if args.ema else "off"
        compiled = ", compiled" if args.compile else ""
        return [f"batch       global {args.batch_size} = {engine.world} rank(s) x accum "
                f"{args.accum_iter} x micro-batch {micro}; {self.steps_per_epoch} steps per epoch",
                f"steps       {steps}", f"ema         {ema}",
                f"precision   {engine.prec}{compiled}", f"output      {args.output_dir}"]

    def stepped(self, step):
        self.step = step
        self.bar.update(1)
        if step % self.args.log_every == 0:
            self.final_loss = self.engine.flush(self.lr_fn)[0]
            self.record("log", self.final_loss)

    def end_epoch(self, signum):
        """After train_one_epoch: flush the losses, log, save. -> True at an epoch's end."""
        epoch_end = self.step % self.steps_per_epoch == 0    # else: the run's end, or a stop
        window, epoch_loss = self.engine.flush(self.lr_fn, epoch_too=epoch_end)
        if window is not None:
            self.final_loss = window
            self.record("log", window)
        if epoch_end:
            self.record("epoch", epoch_loss)
        kept_epoch = epoch_end and self.step // self.steps_per_epoch % self.args.save_every == 0
        if not epoch_end or kept_epoch or self.step >= self.last or signum:
            self.save(epoch_end)
        return epoch_end

    def due(self, every):
        """Is this epoch's end one for a picture every `every` epochs (or the run's end)?"""
        epoch, into = divmod(self.step, self.steps_per_epoch)
        return into == 0 and (epoch % every == 0 or self.step >= self.last)

    def record(self, kind, loss):
        """One log.jsonl line; img/s over the steps since the previous line of this kind."""
        (t0, s0), now = self.marks[kind], time.time()
        self.marks[kind] = (now, self.step)
        secs = max(now - t0, 1e-9)
        rec = {"kind": kind, "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "loss": loss, "lr": self.lr_fn(self.step - 1),
               "img_per_s": round((self.step - s0) * self.args.batch_size / secs, 2),
               "seconds": round(now - self.t_start, 2), "interval_seconds": round(secs, 2),
               "gpu_max_mem_gb": None}
        if self.engine.device.type == "cuda":
            rec["gpu_max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if kind == "log":
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", img_s=rec["img_per_s"])
        self.log.write(rec)

    def save(self, epoch_end):
        """Right after a flush on every rank, so the weights are known finite; rank 0 writes."""
        if self.is_main:
            epoch = self.step // self.steps_per_epoch
            args = {k: v for k, v in vars(self.args).items()
                    if isinstance(v, (int, float, str, bool, type(None)))}
            ckpt = {**self.engine.state(), "step": self.step, "epoch": epoch, "args": args,
                    **self.describe(), "world": self.engine.world, "data": self.data,
                    "rng": {"torch": torch.get_rng_state()}, "version": 1}
            kept = None
            if epoch_end:
                kept = os.path.join(self.args.output_dir, f"checkpoint-{epoch:04d}.pt")
            try:
                save_checkpoint(ckpt, self.latest, kept)
            except UserError as e:                 # a full disk: say what is still safe
                good = ("this run has no checkpoint yet" if self.saved_at is None
                        else f"{self.latest} still holds step {self.saved_at}")
                raise UserError(f"{e}; {good}") from None
        self.saved_at = self.step

    def stop(self, signum):
        """After the save of a stopped run: log it and exit 128 + the signal (cli.Interrupted)."""
        name = signal.Signals(signum).name
        self.log.write({"kind": "stopped", "step": self.step, "signal": name,
                        "seconds": round(time.time() - self.t_start, 2)})
        raise cli.Interrupted(f"[train] stopped by {name} at step {self.step} of {self.last}: "
                              f"saved {self.latest}; continue with the same command and "
                              f"--resume auto", signum)

    def result(self):
        return {"final_loss": self.final_loss, "steps": self.step,
                "seconds": round(time.time() - self.t_start, 2), "checkpoint": self.latest,
                "log": self.log.path}
