"""The training machinery pretrain.py and distill.py share (one way to train): the common flags,
the lr schedule, the optimizer step (Engine: AdamW, EMA, precision, DDP, no host sync per step)
and the loop (TrainingRun: log lines, kept checkpoints, epoch pictures, stop signals, resume).
The processes and the data order are in distributed.py, the run's files in checkpoint.py.

A stage gives it a model whose loss(images, labels) is a scalar, and two callables: what its
checkpoint holds besides the weights (model config, PCA basis, ...) and, optionally, a picture to
write at epoch ends. Determinism: besides the data order (distributed.py), the noise of
micro-batch k of step s is seeded by (seed, s, k), so a resume, even mid-epoch, is bit-identical,
and any layout with the same world x accum computes the same steps.
"""
import contextlib
import copy
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import augment
import checkpoint
import cli
import distributed
from cli import UserError


# ---- Flags every training stage takes -------------------------------------------------------
def add_training_args(p):
    """The schedule, optimiser and run flags of pretrain.py and distill.py (the paper's
    pre-training defaults, RECIPE s6; a stage sets its own with p.set_defaults)."""
    num = cli.bounded
    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=num(float, 0, low_open=True), default=400,
                   help="length of the run (may be fractional)")
    g.add_argument("--max-steps", type=num(int, 1), default=None,
                   help="stop (and save) after this many optimizer steps; the schedule is "
                   "unchanged")
    g.add_argument("--batch-size", type=num(int, 1), default=2048, help="the GLOBAL batch: "
                   "ranks x --accum-iter x micro-batch (MAE's --batch_size is per GPU)")
    g.add_argument("--accum-iter", type=num(int, 1), default=1,
                   help="micro-batches per optimizer step and rank")
    g.add_argument("--blr", type=num(float, 0), default=1e-4, help="lr = blr x batch / 256")
    g.add_argument("--lr", type=num(float, 0), default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=num(float, 0), default=0.0, help="floor of the cosine")
    g.add_argument("--warmup-epochs", type=num(float, 0), default=100, help="linear warmup")
    g.add_argument("--weight-decay", type=num(float, 0), default=0.0,
                   help="AdamW decay of the matrices (paper: 0)")
    g.add_argument("--ema", type=num(float, 0, 1, high_open=True), default=0.9999,
                   help="EMA decay, warmed up as (1+step)/(10+step); 0 = off")
    g.add_argument("--clip-grad", type=num(float, 0, low_open=True), default=None,
                   help="max gradient norm (default: no clipping)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the loss path")
    g.add_argument("--aug", default="center", choices=["center", "rrc"],
                   help="center crop (the ablations) or RandomResizedCrop + flip (final models)")
    g.add_argument("--seed", type=int, default=0, help="fixes init, data order, crops and noise")
    g = p.add_argument_group("run: outputs and resume")
    g.add_argument("--output-dir", default="out",
                   help="checkpoint.pt, checkpoint-EPOCH.pt, log.jsonl, grid*.png, pca.pt")
    g.add_argument("--resume", default=None,
                   help="'auto' (OUTPUT_DIR/checkpoint.pt when present) or a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an OUTPUT_DIR that holds a previous run's checkpoint")
    g.add_argument("--save-every", type=num(int, 1), default=20,
                   help="epochs between kept checkpoints (and one at the end)")
    g.add_argument("--log-every", type=num(int, 1), default=50,
                   help="steps between log lines (the only host syncs)")
    g.add_argument("--grid-every", type=num(int, 1), default=20,
                   help="epochs between denoising grids (and one at the end)")
    return p


# ---- The lr schedule ------------------------------------------------------------------------
def lr_at(step, steps_per_epoch, base_lr, warmup_epochs, epochs, min_lr=0.0):
    """RECIPE s6: linear warmup, then half-cycle cosine, per iteration on the fractional epoch."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1e-12, epochs - warmup_epochs))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(args, batch_size):
    """--lr, or MAE's linear scaling rule lr = --blr x batch / 256 (RECIPE s5, s6)."""
    if args.lr is not None:
        return args.lr
    return args.blr * batch_size / 256


# ---- One optimizer step -----------------------------------------------------------------------
class LossModule(nn.Module):
    """DDP syncs the gradients of what ran through its forward(), so forward = the model's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


class Diverged(UserError):
    """A non-finite loss or gradient: the run stops (exit 2 via cli.run_cli) and saves nothing."""


def pick_precision(choice, device):
    """--precision auto: bf16 on CUDA where supported, else fp16 (+ GradScaler); fp32 on CPU."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16"


class Engine:
    """Model + EMA (RECIPE s6: our choice) + AdamW + precision + DDP. step() is one optimizer step
    with no host sync inside: losses and the first bad step stay on the device until flush()."""

    def __init__(self, model, args, rank, world, device):
        self.model, self.args, self.rank, self.world, self.device = model, args, rank, world, device
        self.prec = pick_precision(args.precision, device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.prec]
        self.params = [p for p in model.parameters() if p.requires_grad]
        matrices = [p for p in self.params if p.ndim >= 2]
        vectors = [p for p in self.params if p.ndim < 2]
        groups = [{"params": matrices, "weight_decay": args.weight_decay},
                  {"params": vectors, "weight_decay": 0.0}]
        # RECIPE s6: AdamW (0.9, 0.999); the fused kernel on CUDA (unfused it is ~26% of a step)
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999),
                                     fused=device.type == "cuda")
        self.scaler = None
        if self.prec == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        self.ema, self.ema_params = None, None
        if args.ema > 0:                           # an fp32 copy, never trained
            self.ema = copy.deepcopy(model).float().eval().requires_grad_(False)
            self.ema_params = [q for q, p in zip(self.ema.parameters(), model.parameters())
                               if p.requires_grad]
        self.ddp = None
        if world > 1:                              # compile(DDP(m)): graphs split at bucket borders
            ids = [device] if device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(LossModule(model), device_ids=ids)
        self.loss_fn = self.ddp or LossModule(model)
        if args.compile:
            self.loss_fn = torch.compile(self.loss_fn)
        # running sums on the device, read at flush(): (loss sum, steps) of the log window / epoch
        self.window = torch.zeros(2, device=device)
        self.epoch = torch.zeros(2, device=device)
        self.first_bad_step = torch.tensor(math.inf, device=device)   # inf: none yet
        self.first_bad_gnorm = torch.tensor(0.0, device=device)
        self.gnorm = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def step(self, micro, step, lr):
        """micro: this rank's accum (images, labels) micro-batches of optimizer step `step`."""
        for group in self.opt.param_groups:
            group["lr"] = lr                       # set every step from the pure schedule
        accum, total = len(micro), 0.0
        for a, (x, y) in enumerate(micro):
            # the noise (t, eps) of global micro-batch k = rank x accum + a of step s is seeded by
            # (seed, s, k): the same whichever rank or accumulation step computes it
            torch.manual_seed(distributed.mix_seed(self.args.seed, 3, step, self.rank * accum + a))
            x = augment.batch_to_images(x, self.device)          # --decode gpu decodes here
            y = y.to(self.device, non_blocking=True)
            sync_now = self.ddp is None or a == accum - 1
            with contextlib.nullcontext() if sync_now else self.ddp.no_sync():
                with self.autocast():
                    loss = self.loss_fn(x, y)           # mean over the micro-batch
                # / accum, and DDP averages the ranks: the mean over the global batch
                self.backward(loss / accum)
            total = total + loss.detach().float()
        self.update()
        if self.ema is not None:
            # the decay warms up as (1 + s) / (10 + s): a short run's EMA is not mostly its init
            decay = min(self.args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - decay)
        mean = total / accum
        one = torch.stack([mean, torch.ones_like(mean)])
        self.window += one
        self.epoch += one
        self.note_if_bad(mean, step)

    def backward(self, loss):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def update(self):
        """Unscale, clip, step, zero: the optimizer half of step()."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        self.gnorm = nn.utils.get_total_norm(grads).float()
        if self.args.clip_grad:
            nn.utils.clip_grads_with_norm_(self.params, self.args.clip_grad, self.gnorm)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def note_if_bad(self, mean, step):
        """Remember (on the device) the first step whose loss or gradient was not finite."""
        # fp16: an inf gradient now and then is normal (GradScaler skips that step)
        finite = torch.isfinite(mean) & (torch.isfinite(self.gnorm) | (self.scaler is not None))
        first = ~finite & torch.isinf(self.first_bad_step)
        self.first_bad_step = torch.where(first, torch.full_like(mean, step + 1),
                                          self.first_bad_step)
        self.first_bad_gnorm = torch.where(first, self.gnorm, self.first_bad_gnorm)

    def flush(self, lr_fn, epoch_too=False):
        """The only host sync: all-reduce the sums -> (window loss, epoch loss or None); raises
        Diverged if a loss or gradient was non-finite."""
        sums = torch.cat([self.window, self.epoch])
        first_bad = self.first_bad_step.clone()
        if self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        window_loss, window_steps, epoch_loss, epoch_steps = sums.tolist()
        bad_step = first_bad.item()
        self.window.zero_()
        if epoch_too:
            self.epoch.zero_()
        if math.isfinite(bad_step) or not all(map(math.isfinite, (window_loss, epoch_loss))):
            s = int(bad_step) if math.isfinite(bad_step) else None
            raise Diverged(f"non-finite loss at step {s} (lr {lr_fn(max(s or 1, 1) - 1):.3g}, "
                           f"grad norm {self.first_bad_gnorm.item():.3g})")
        window = window_loss / window_steps if window_steps else None
        epoch = epoch_loss / epoch_steps if epoch_steps and epoch_too else None
        return window, epoch

    def state(self):
        ema = self.ema.state_dict() if self.ema is not None else None
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return {"model": self.model.state_dict(), "ema": ema, "optimizer": self.opt.state_dict(),
                "scaler": scaler}

    def restore(self, ckpt):
        checkpoint.load_weights(self.model, ckpt["model"])
        if self.ema is not None:
            checkpoint.load_weights(self.ema, ckpt["ema"] or ckpt["model"], "checkpoint EMA")
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def run_settings_lines(args, engine, start, last):
    """The lines every trainer's effective-settings block ends with: steps, EMA, precision and
    output folder."""
    steps = f"{start} -> {last}"
    if args.max_steps:
        steps += f" (--max-steps {args.max_steps})"
    ema = "off"
    if args.ema:
        ema = f"{args.ema:g}"
    compiled = ""
    if args.compile:
        compiled = ", compiled"
    return [f"steps       {steps}", f"ema         {ema}",
            f"precision   {engine.prec}{compiled}", f"output      {args.output_dir}"]


# ---- The loop ---------------------------------------------------------------------------------
class TrainingRun:
    """The steps from a start step to `last`: log lines, kept checkpoints, epoch pictures; a
    signal stops it cleanly after a save.

    describe() -> what the checkpoint holds besides the engine state (model_config, pca, ...);
    picture(path) writes an image of the model at an epoch end (or None)."""

    def __init__(self, args, engine, train_set, world, lr_fn, last, describe, picture=None):
        self.args, self.engine, self.world, self.lr_fn, self.last = args, engine, world, lr_fn, last
        self.describe, self.picture = describe, picture
        self.is_main = engine.rank == 0
        self.steps_per_epoch = len(train_set) // args.batch_size    # drop the last partial batch
        loading = distributed.make_loader(train_set, args, world, engine.rank, engine.device)
        self.sampler, self.indexed, self.loader = loading
        self.latest = os.path.join(args.output_dir, "checkpoint.pt")
        self.log_path = os.path.join(args.output_dir, "log.jsonl")
        self.step, self.saved_at, self.final_loss = 0, None, None
        self.t_start = time.time()

    def first_images(self, n=8):
        """The first n training images (epoch 0's augmentation), on the device: for pictures."""
        items = [self.indexed[(0, i)] for i in range(min(n, len(self.indexed.base)))]
        return augment.batch_to_images(augment.collate(items)[0], self.engine.device)

    def run(self, start, source=None, changed=()):
        """Train from step `start` (> 0: resumed from `source`) -> the final JSON result."""
        self.step = start
        resume = None
        if source is not None:
            self.saved_at = start
            resume = {"kind": "resume", "step": start, "from": source, "changed": list(changed),
                      "seconds": 0.0}
            self.restore_kept_copy(source)
        self.log = checkpoint.RunLog(self.log_path, self.is_main, resume)
        now = time.time()
        self.marks = {"log": (now, start), "epoch": (now, start)}
        signum = 0
        try:
            with distributed.StopSignal(self.world) as stop:
                with cli.progress(total=self.last, initial=start, disable=not self.is_main,
                                  unit="step") as self.bar:
                    while self.step < self.last and not signum:
                        signum = self.run_epoch(stop)
        except Diverged as e:
            kept = f"{self.latest} (step {self.saved_at}) is untouched"
            if self.saved_at is None:
                kept = "no checkpoint was written"
            raise Diverged(f"{e}; stopped without saving: {kept}. Lower --lr/--blr or set "
                           f"--clip-grad") from None
        if signum:
            self.stopped(signum)
        return self.finish()

    def run_epoch(self, stop):
        """The rest of the current epoch (or of the run) -> the signal that stopped it, or 0."""
        per_epoch, signum = self.steps_per_epoch, 0
        # mid-epoch (a resume): skip what this epoch has already seen
        self.sampler.set_epoch(self.step // per_epoch, self.step % per_epoch)
        batches = iter(self.loader)
        for _ in range(min(per_epoch - self.step % per_epoch, self.last - self.step)):
            micro = [next(batches) for _ in range(self.args.accum_iter)]
            self.engine.step(micro, self.step, self.lr_fn(self.step))
            self.step += 1
            self.bar.update(1)
            if self.step % self.args.log_every == 0:
                self.final_loss = self.engine.flush(self.lr_fn)[0]
                self.record("log", self.final_loss)
            signum = stop.agreed()
            if signum:
                break
        del batches
        epoch_end = self.step % per_epoch == 0           # else: the run's end mid-epoch, or a stop
        window, epoch_loss = self.engine.flush(self.lr_fn, epoch_too=epoch_end)
        if window is not None:
            self.final_loss = window
            self.record("log", window)
        if epoch_end:
            self.record("epoch", epoch_loss)
        epoch, at_end = self.step // per_epoch, self.step >= self.last
        kept_epoch = epoch_end and epoch % self.args.save_every == 0
        if not epoch_end or kept_epoch or at_end or signum:
            self.save(epoch_end)
        picture_due = epoch_end and (epoch % self.args.grid_every == 0 or at_end)
        if self.is_main and picture_due and self.picture is not None:
            self.picture(os.path.join(self.args.output_dir, f"grid-{epoch:04d}.png"))
        return signum

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
                    **self.describe(), "world": self.world,
                    "rng": {"torch": torch.get_rng_state()}, "version": 1}
            kept = None
            if epoch_end:
                kept = os.path.join(self.args.output_dir, f"checkpoint-{epoch:04d}.pt")
            try:
                checkpoint.save_checkpoint(ckpt, self.latest, kept)
            except UserError as e:                 # a full disk: say what is still safe
                good = f"{self.latest} still holds step {self.saved_at}"
                if self.saved_at is None:
                    good = "this run has no checkpoint yet"
                raise UserError(f"{e}; {good}") from None
        self.saved_at = self.step

    def restore_kept_copy(self, source):
        """A kill in an older version's save could lose a kept epoch copy: write it again."""
        epoch, into = divmod(self.step, self.steps_per_epoch)
        kept = os.path.join(self.args.output_dir, f"checkpoint-{epoch:04d}.pt")
        due = into == 0 and epoch % self.args.save_every == 0
        if self.is_main and due and not os.path.exists(kept):
            cli.atomic_write(kept, lambda tmp: checkpoint.link_or_copy(source, tmp))

    def stopped(self, signum):
        name = signal.Signals(signum).name
        self.log.write({"kind": "stopped", "step": self.step, "signal": name,
                        "seconds": round(time.time() - self.t_start, 2)})
        raise cli.Interrupted(f"[train] stopped by {name} at step {self.step} of {self.last}: "
                              f"saved {self.latest}; continue with the same command and "
                              f"--resume auto", signum)

    def finish(self):
        if not self.is_main:
            return None
        res = {"final_loss": self.final_loss, "steps": self.step,
               "seconds": round(time.time() - self.t_start, 2), "checkpoint": self.latest,
               "log": self.log_path}
        if self.picture is not None:
            res["grid"] = self.picture(os.path.join(self.args.output_dir, "grid.png"))
        return res
