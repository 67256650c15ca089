"""The files of a training run (pretrain.py, distill.py): the run log, checkpoints, and resume.

OUTPUT_DIR holds checkpoint.pt (the latest save), checkpoint-EPOCH.pt (kept epoch ends;
checkpoint.pt is then a hard link to the newest), log.jsonl and the stage's own files. A fresh run
never replaces a previous run's checkpoint unless told to (--overwrite); --resume continues the
same run, refusing any flag change that would alter the data order, the schedule or the model;
every write goes through cli.atomic_write, so a kill at any point leaves the previous file or the
whole new one.
"""
import contextlib
import json
import math
import os
import shutil

import torch

import cli
from cli import UserError

# What --resume may change: nothing here alters the data order, the schedule or the model
RESUME_MAY_CHANGE = ("max_steps", "save_every", "log_every", "grid_every", "num_workers",
                     "compile", "precision", "resume", "overwrite", "output_dir", "download",
                     "peak_tflops", "benchmark", "pca", "pca_images", "pca_center", "preset",
                     "synthetic_val_size", "accum_iter")
# The files a run writes in its OUTPUT_DIR (their stale temporary files are removed at start)
RUN_FILES = ("checkpoint", "pca.pt", "log.jsonl", "grid")


def load_weights(model, state_dict, what="checkpoint"):
    """load_state_dict, strictly, with a mismatch said in one line instead of a traceback."""
    try:
        res = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:                              # shape mismatches
        raise UserError(f"{what} weights do not fit its model config: {str(e)[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        raise UserError(f"{what} does not match the model: missing keys {res.missing_keys[:8]}, "
                        f"unexpected keys {res.unexpected_keys[:8]}")


# ---- Outputs: log and checkpoints -------------------------------------------------------------
class RunLog:
    """OUTPUT_DIR/log.jsonl, written by rank 0. A resumed run reads as one run: the records past
    the step it resumes from (written after that checkpoint, so replayed now) are dropped and a
    "resume" record marks the join. A fresh run starts an empty log."""

    def __init__(self, path, active, resume=None):
        self.path, self.active = path, active
        if not active:
            return
        kept = []
        if resume is not None and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    with contextlib.suppress(ValueError):          # a line torn by a kill
                        if json.loads(line).get("step", math.inf) <= resume["step"]:
                            kept.append(line if line.endswith("\n") else line + "\n")
        if resume is not None:
            kept.append(json.dumps(resume) + "\n")
        cli.atomic_write(path, lambda tmp: cli.write_lines(tmp, kept))

    def write(self, record):
        if not self.active:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise cli.write_error(e, self.path) from None


def link_or_copy(src, dst):
    try:
        os.link(src, dst)                          # no second write of a multi-GB file
    except OSError:
        shutil.copyfile(src, dst)


def save_checkpoint(ckpt, latest, kept=None):
    """checkpoint.pt, and at kept epoch ends checkpoint-EPOCH.pt. The kept copy is written first
    and checkpoint.pt then made its hard link, so a kill between the two leaves checkpoint.pt at
    the previous save, and the resumed run writes the same kept copy again: none is lost."""
    if kept is None:
        return cli.save_torch(ckpt, latest)
    cli.save_torch(ckpt, kept)
    return cli.atomic_write(latest, lambda tmp: link_or_copy(kept, tmp), cli.nbytes(ckpt))


def load_checkpoint(path, required=("model", "model_config", "step")):
    """-> checkpoint dict, read with weights_only=True. UserError if missing or not one of ours."""
    ckpt = cli.load_torch(path, "checkpoint", "pass a checkpoint.pt written by this project")
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project (no {', '.join(missing)})")
    return ckpt


# ---- Resume -----------------------------------------------------------------------------------
def resume_source(args, latest):
    """-> the checkpoint this run continues, or None for a fresh run. A restarted torchrun worker
    group (--max-restarts) resumes by itself; a fresh run never replaces a previous run's
    checkpoint unless told to (--overwrite)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if args.resume is None and restarts > 0 and os.path.isfile(latest):
        print(f"[resume] torchrun restart {restarts}: resuming from {latest}", flush=True)
        return latest
    if args.resume is None:
        if os.path.isfile(latest) and not args.overwrite:
            raise UserError(f"{latest} holds a previous run; continue it with --resume auto, "
                            f"start over in another --output-dir, or pass --overwrite to "
                            f"replace it")
        return None
    if args.overwrite:
        raise UserError("--overwrite starts over and --resume continues: pass one of them")
    if args.resume == "auto":
        if os.path.isfile(latest):
            return latest
        return None
    return args.resume


def check_resume(ckpt, args, world, ignore=(), skip=()):
    """--resume continues the same run: every flag that fixes the data order, the schedule or the
    model must be as saved (`ignore`: flags the caller compares another way, such as the model
    flags through the model config); RESUME_MAY_CHANGE may change. `skip`: not yet comparable.
    -> the changed safe flags, "--flag old -> new" each."""
    saved = {"decode": "pil", **ckpt["args"]}    # checkpoints from before --decode: pil
    now = vars(args)
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


def flag(dest):
    return "--" + dest.replace("_", "-")


def open_run(args, is_main, world, ignore):
    """Before any work: a writable OUTPUT_DIR, the checkpoint to resume (None: a fresh run) with
    every flag already comparable checked, and no temporary file a killed run left.
    -> (checkpoint path or None, checkpoint dict or None)."""
    cli.check_writable_dir(args.output_dir, "--output-dir")
    latest = os.path.join(args.output_dir, "checkpoint.pt")
    source = resume_source(args, latest)
    ckpt = None
    if source:
        ckpt = load_checkpoint(source)
        check_resume(ckpt, args, world, ignore, skip=("batch_size",))   # batch: after the cap
    if is_main:
        stale = cli.clean_stale_temps(args.output_dir, RUN_FILES)
        if stale:
            print(f"[train] removed {len(stale)} temporary file(s) a killed run left: "
                  f"{', '.join(stale[:4])}", flush=True)
    return source, ckpt


def restore(engine, ckpt, config, ignore=("grad_checkpoint",)):
    """A resumed run's model, EMA, optimizer and CPU RNG -> the step it continues from.
    `ignore`: config keys that change no number (recomputed activations)."""
    if ckpt is None:
        return 0
    same = {k: v for k, v in ckpt["model_config"].items() if k not in ignore}
    if same != {k: v for k, v in config.items() if k not in ignore}:
        raise UserError(f"--resume: the checkpoint's model {ckpt['model_config']} differs from "
                        f"this run's {config}; pass the same model flags")
    engine.restore(ckpt)
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"]
