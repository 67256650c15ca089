"""The trainers' optimizer step (Engine) and epoch (train_one_epoch), as MAE's engine_pretrain.py.
Noise is f(seed, step, micro-batch), data order f(seed, epoch): a resume is bit-identical."""
import contextlib
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from util import decode, distributed
from util.cli import UserError


class LossModule(nn.Module):
    """DDP syncs the gradients of what ran through its forward(), so forward = the model's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


class Diverged(UserError):
    """A non-finite loss or gradient: the run stops (exit 2) and saves nothing."""


def pick_precision(choice, device):
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class Engine:
    """Model + EMA + AdamW + precision + DDP (the paper gives AdamW's betas; the rest is ours,
    RECIPE s6). step() never syncs with the host: losses and the first bad step wait for flush()."""

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
        self.scaler = torch.amp.GradScaler(device.type) if self.prec == "fp16" else None
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
            # global micro-batch k = rank x accum + a: the same noise on whichever rank computes it
            torch.manual_seed(distributed.mix_seed(self.args.seed, 3, step, self.rank * accum + a))
            x = decode.batch_to_images(x, self.device)           # --decode gpu decodes here
            y = y.to(self.device, non_blocking=True)
            sync_now = self.ddp is None or a == accum - 1
            with contextlib.nullcontext() if sync_now else self.ddp.no_sync():
                with self.autocast():
                    loss = self.loss_fn(x, y)           # mean over the micro-batch
                # / accum, and DDP averages the ranks: the mean over the global batch
                scaled = loss / accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
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
        # the first non-finite step, kept on the device (fp16: an inf gradient is normal, skipped)
        finite = torch.isfinite(mean) & (torch.isfinite(self.gnorm) | (self.scaler is not None))
        first = ~finite & torch.isinf(self.first_bad_step)
        bad_step = torch.full_like(mean, step + 1)
        self.first_bad_step = torch.where(first, bad_step, self.first_bad_step)
        self.first_bad_gnorm = torch.where(first, self.gnorm, self.first_bad_gnorm)

    def update(self):
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

    def flush(self, lr_fn, epoch_too=False):
        """The only host sync -> (window loss, epoch loss or None); a non-finite step: Diverged."""
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
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}


def train_one_epoch(engine, loader, epoch, run, stop):
    """The steps of `epoch` from run.step to its end or run.last -> the agreed stop signal, or 0."""
    per_epoch = run.steps_per_epoch
    loader.batch_sampler.set_epoch(epoch, run.step - epoch * per_epoch)
    batches = iter(loader)
    end = min((epoch + 1) * per_epoch, run.last)
    signum = 0
    while run.step < end and not signum:
        micro = [next(batches) for _ in range(engine.args.accum_iter)]
        engine.step(micro, run.step, run.lr_fn(run.step))
        run.stepped(run.step + 1)
        signum = stop.agreed()
    return signum
