"""Pre-train an l-DAE (RECIPE s3, s4, s6), or a DiT baseline row, on a CPU, one GPU, or many.

Quick start (CPU, synthetic shapes, ~1 min; writes out/tiny/{checkpoint.pt,log.jsonl,grid.png,pca.pt}):
  python pretrain.py --model vit_tiny --output-dir out/tiny
  (the small models' defaults: SMALL_DEFAULTS below and d = 8, whitened latents in ldae.MODELS)
Same with DDP (2 CPU processes over gloo; same losses as one process with --accum-iter 2):
  torchrun --nproc_per_node=2 pretrain.py --model vit_tiny --output-dir out/tiny_ddp
ImageNet, final ViT-B l-DAE (RECIPE s6: batch 2048, blr 1e-4, 100 warmup of 400 epochs, rrc):
  torchrun --nproc_per_node=8 pretrain.py --model vit_b --dataset imagefolder --data-path IMNET \\
      --batch-size 2048 --epochs 400 --warmup-epochs 100 --aug rrc --pca-images 10000 \\
      --output-dir out/vit_b
  Continue a stopped run with --resume auto (bit-identical to an uninterrupted run). Under
  `torchrun --max-restarts N` a restarted worker group resumes by itself. SIGTERM or Ctrl-C:
  the run finishes its step, saves, and exits 128 + the signal number. --decode gpu decodes the
  JPEGs on the GPU when the CPUs cannot keep up (see data.py).
A paper row: python pretrain.py --preset t3_ldae ...   (dit_baseline.PRESETS; explicit flags win)
Speed:       python pretrain.py --model vit_b --benchmark 20 --batch-size 256 [--compile]

Determinism: data order, augmentation and noise are pure functions of (seed, epoch, index) and
(seed, step, micro-batch) (GlobalBatchSampler, Indexed, Engine.step), so a resume is exact and any
layout with the same world x accum (8 GPUs, or 1 GPU with --accum-iter 8) computes the same steps.
"""
import contextlib
import copy
import datetime
import json
import math
import os
import shutil
import signal
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import data
import dit_baseline
import ldae
from data import UserError
from tokenizer_pca import PatchPCA, fit_pca

FAMILIES = {"ldae": ldae, "dit": dit_baseline}
ALL_MODELS = {**ldae.MODELS, **dit_baseline.MODELS}
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
               "L40S": 362.0}                                    # dense bf16, per GPU
GRID_T = (100, 300, 500, 700, 900)
# Training defaults of the CPU-sized models (32 px), measured to learn on the synthetic set and
# Fashion-MNIST (README, Reproduction); every other model keeps the paper's (RECIPE s6). They sit
# under explicit flags and replace a --preset's ImageNet-sized batch, lr and length.
_SMALL = dict(batch_size=64, lr=4e-3, epochs=10, warmup_epochs=1, ema=0.999, pca_images=500,
              save_every=5, grid_every=5, log_every=10, input_size=None)   # None: the model's
SMALL_DEFAULTS = {name: _SMALL for name in ("vit_tiny", "vit_small", "dit_tiny_1", "dit_tiny_2")}
# The flags of the "model flags" group: the model config (stored in the checkpoint) holds them
MODEL_ARGS = ("latent_dim", "latent_scale", "latent_norm", "cond_ratio", "residual_weight",
              "noise", "single_sigma", "target", "patch_size", "grad_checkpoint", "schedule",
              "prediction", "class_cond", "dit_input", "latents_file")
# What --resume may change: nothing here alters the data order, the schedule or the model
RESUME_MAY_CHANGE = ("max_steps", "save_every", "log_every", "grid_every", "num_workers",
                     "compile", "precision", "resume", "overwrite", "output_dir", "download",
                     "peak_tflops", "benchmark", "pca", "pca_images", "pca_center", "preset",
                     "synthetic_val_size", "accum_iter")


# ---- Models and checkpoints -------------------------------------------------------------------
def family_of(name):
    """'ldae' or 'dit': the one place that decides which model file a --model name lives in."""
    if name in ldae.MODELS:
        return "ldae"
    if name in dit_baseline.MODELS:
        return "dit"
    raise UserError(f"unknown --model {name!r}; choose from {', '.join(sorted(ALL_MODELS))}")


def build_model(name, pca=None, **overrides):
    """The family's build_model with its MODEL_FLAGS (None = the registry's value). A flag of the
    other family is refused, not dropped: `--class-cond true` means nothing to an l-DAE."""
    fam = FAMILIES[family_of(name)]
    given = {k: v for k, v in overrides.items() if v is not None and v is not False}
    foreign = sorted(k for k in given if k not in fam.MODEL_FLAGS and k in MODEL_ARGS)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        kind = "an l-DAE" if fam is ldae else "a DiT"
        raise UserError(f"{flags}: not a flag of --model {name} ({kind}); drop it, or pick a "
                        f"model of the other family (a --preset sets the flags of its own family)")
    kept = {k: v for k, v in overrides.items() if k in fam.MODEL_FLAGS and v is not None}
    try:
        return fam.build_model(name, pca, **kept)
    except (ValueError, KeyError, TypeError) as e:       # a size or flag the model cannot take
        raise UserError(f"--model {name}: {e}") from None


def load_checkpoint(path):
    """-> checkpoint dict, read with weights_only=True. UserError if missing or not one of ours."""
    ckpt = data.load_torch(path, "checkpoint", "pass a checkpoint.pt written by pretrain.py")
    missing = [k for k in ("model", "model_config", "pca", "step")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a pretrain.py checkpoint (no {', '.join(missing)})")
    return ckpt


def load_weights(model, state_dict, what="checkpoint"):
    """load_state_dict, strictly, with a mismatch said in one line instead of a traceback."""
    try:
        res = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:                              # shape mismatches
        raise UserError(f"{what} weights do not fit its model config: {str(e)[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        raise UserError(f"{what} does not match the model: missing keys {res.missing_keys[:8]}, "
                        f"unexpected keys {res.unexpected_keys[:8]}")


def model_from_checkpoint(ckpt, weights="ema", device="cpu"):
    """The checkpoint's exact model (its config + PCA basis) with its EMA or raw weights."""
    cfg = dict(ckpt["model_config"])
    fam, name = cfg.pop("family", "ldae"), cfg.pop("name", None)
    cfg.setdefault("latent_norm", "none")      # checkpoints from before --latent-norm
    if fam not in FAMILIES or name not in FAMILIES[fam].MODELS:
        raise UserError(f"the checkpoint's model {fam!r} / {name!r} is not in this version's "
                        f"registry ({', '.join(sorted(ALL_MODELS))})")
    sd = ckpt.get("ema") if weights == "ema" else ckpt["model"]
    if sd is None:
        print("[ckpt] no EMA weights in this checkpoint (trained with --ema 0): using the raw weights")
        sd = ckpt["model"]
    try:
        model = FAMILIES[fam].build_model(name, PatchPCA.from_dict(ckpt["pca"]), **cfg)
    except (ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"the checkpoint's model config cannot be built ({e}); was it written by "
                        f"another version of pretrain.py?") from None
    load_weights(model, sd)
    return model.to(device).eval()


# ---- Flags ------------------------------------------------------------------------------------
class PresetParser(data.ArgumentParser):
    """Defaults in layers, explicit flags always win: --preset NAME sets dit_baseline.PRESETS[NAME],
    then a small model's training defaults (SMALL_DEFAULTS: CPU-sized batch, lr, length)
    replace the preset's ImageNet-sized ones; then the command line is parsed again."""

    def parse_known_args(self, args=None, namespace=None):
        # the layers are set for this one call: a parser used again starts from its own defaults
        own = {a.dest: a.default for a in self._actions}
        try:
            return self._parse_layered(args, namespace)
        finally:
            self.set_defaults(**own)

    def _parse_layered(self, args, namespace):
        ns, rest = super().parse_known_args(args, copy.copy(namespace))
        preset = getattr(ns, "preset", None)
        if preset and preset not in dit_baseline.PRESETS:
            self.error(f"unknown --preset {preset!r}; choose from {', '.join(sorted(dit_baseline.PRESETS))}")
        if preset:
            self.set_defaults(**dit_baseline.PRESETS[preset])
            ns, rest = super().parse_known_args(args, copy.copy(namespace))
        small = SMALL_DEFAULTS.get(getattr(ns, "model", None))
        if preset or small:
            self.set_defaults(**(small or {}))
            ns, rest = super().parse_known_args(args, namespace)
        return ns, rest


def get_args_parser():
    num = data.bounded
    p = PresetParser(prog="pretrain.py", description="Pre-train an l-DAE or a DiT baseline row "
                     "(RECIPE.md s3, s4, s6). Defaults are the paper's ImageNet recipe; the 32 px "
                     "CPU models (vit_tiny, vit_small, dit_tiny_*) get pretrain.SMALL_DEFAULTS.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_b", help=f"one of {', '.join(sorted(ALL_MODELS))}")
    g.add_argument("--preset", default=None, help="a paper row, dit_baseline.PRESETS (sets "
                   "defaults; explicit flags win)")
    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=num(float, 0, low_open=True), default=400,
                   help="length of the run (may be fractional)")
    g.add_argument("--max-steps", type=num(int, 1), default=None,
                   help="stop (and save) after this many optimizer steps; the schedule is unchanged")
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
    g = p.add_argument_group("PCA tokenizer (RECIPE s2)")
    g.add_argument("--pca", default=None,
                   help="a tokenizer_pca.py file; default: fit on the train set -> OUTPUT_DIR/pca.pt")
    g.add_argument("--pca-images", type=num(int, 1), default=1000,
                   help="train images for that fit (ImageNet: 10000+)")
    g.add_argument("--pca-center", action="store_true", help="subtract the mean patch in that fit")
    g = p.add_argument_group("model flags (default: the registry's value; ldae.py / "
                             "dit_baseline.py MODEL_FLAGS)")
    g.add_argument("--latent-dim", type=num(int, 0), default=None,
                   help="d: PCA coordinates the noise goes into (DiT: 0 = all D, the pixel row)")
    g.add_argument("--latent-norm", default=None, choices=["none", "global", "whiten"],
                   help="latent normalisation before the noise (RECIPE s2)")
    g.add_argument("--latent-scale", type=num(float, 0, low_open=True), default=None,
                   help="z = scale x gain x V_d x")
    g.add_argument("--cond-ratio", type=num(float, 0, low_open=True), default=None,
                   help="conditioning width / model width (paper rows 0.25, official DiT 1)")
    g.add_argument("--patch-size", type=num(int, 1), default=None, help="image patch side p")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in the backward pass (memory)")
    g.add_argument("--residual-weight", type=num(float, 0), default=None,
                   help="l-DAE: loss weight of the coordinates beyond d (paper 0.1)")
    g.add_argument("--noise", default=None, choices=["multi", "single"], help="l-DAE: noise levels")
    g.add_argument("--single-sigma", type=num(float, 0, low_open=True), default=None,
                   help="l-DAE: the one level of --noise single (sqrt(1/3))")
    g.add_argument("--target", default=None, choices=["original", "projected", "latent"],
                   help="l-DAE: what the network predicts (Table 3's last rows)")
    g.add_argument("--schedule", default=None, choices=list(dit_baseline.SCHEDULES),
                   help="DiT: noise schedule")
    g.add_argument("--prediction", default=None, choices=list(dit_baseline.PREDICTIONS),
                   help="DiT: eps or x0 prediction")
    g.add_argument("--class-cond", default=None, choices=["true", "false"],
                   help="DiT: class-conditional (Table 1 row 1)")
    g.add_argument("--dit-input", default=None, choices=["pca", "latents"],
                   help="DiT: the PCA latent of the images, or --latents-file")
    g.add_argument("--latents-file", default=None,
                   help="DiT: {'latents': (N, C, h, w), 'labels': (N,)} from your tokenizer")
    g = p.add_argument_group("run: outputs, resume, benchmark")
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
    g.add_argument("--benchmark", type=num(int, 0), default=0, metavar="N",
                   help="time N steps on random data: img/s, TFLOP/s, MFU, memory; then exit")
    g.add_argument("--peak-tflops", type=num(float, 0, low_open=True), default=None,
                   help="per-device peak for MFU (default: a table of known GPUs)")
    data.add_data_args(p)
    p.set_defaults(input_size=None)            # None: the model's img_size (vit_tiny 32, vit_b 256)
    return p


def model_overrides(args, **extra):
    """The model flags of args (build_model keeps the family's); --input-size is img_size."""
    given = {k: getattr(args, k) for k in MODEL_ARGS if hasattr(args, k)}
    return {**given, "img_size": args.input_size, **extra}


# ---- Schedule and determinism -----------------------------------------------------------------
def lr_at(step, steps_per_epoch, base_lr, warmup_epochs, epochs, min_lr=0.0):
    """RECIPE s6: linear warmup, then half-cycle cosine, per iteration on the fractional epoch (MAE)."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1e-12, epochs - warmup_epochs))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mix_seed(*xs):
    """A 63-bit seed from a few ints (FNV-style; no Python hash randomisation involved)."""
    h = 0xCBF29CE484222325
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % 2**64
    return h % 2**63


class Indexed(torch.utils.data.Dataset):
    """Keys are (epoch, index); the image's augmentation is drawn from the CPU RNG seeded by
    (seed, epoch, index): the same in any worker, on any rank, and after a mid-epoch resume."""

    def __init__(self, base, seed):
        self.base, self.seed = base, seed

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):   # torchvision transforms use the global CPU RNG
            torch.manual_seed(mix_seed(self.seed, 1, *key))
            return self.base[key[1]]


class GlobalBatchSampler:
    """DistributedSampler's job (set_epoch, a slice per rank), but each global batch is cut into
    world x accum contiguous micro-batches (rank r owns k = r x accum + a) and an epoch can start at
    any step. Permutation = f(seed, epoch); the incomplete last global batch is dropped."""

    def __init__(self, n, global_batch, world, rank, accum, seed):
        self.n, self.global_batch, self.rank, self.accum, self.seed = n, global_batch, rank, accum, seed
        self.micro = global_batch // (world * accum)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        order = torch.Generator().manual_seed(mix_seed(self.seed, 2, self.epoch))
        perm = torch.randperm(self.n, generator=order)
        for step in range(self.start, self.n // self.global_batch):
            for a in range(self.accum):
                first = step * self.global_batch + (self.rank * self.accum + a) * self.micro
                yield [(self.epoch, int(i)) for i in perm[first:first + self.micro]]


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGTERM / SIGINT to the main process, which finishes the step,
    saves and then shuts them down (a worker killed first would fail the step being finished)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- Distributed ------------------------------------------------------------------------------
def setup_distributed():
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: NCCL on GPUs, gloo on CPU; else one process."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # long timeout: rank 0 may fit the PCA while the others wait at a barrier
        timeout = datetime.timedelta(minutes=60)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across an elastic restart (--max-restarts): keys of this
        # attempt's own, or a restarted worker may read the previous attempt's addresses and hang
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


class StopSignal:
    """SIGTERM (a cluster's notice before it kills a job) or SIGINT (Ctrl-C) asks the run to stop:
    it finishes the step, saves a resumable checkpoint and exits. Under torchrun all ranks must
    stop after the same step, so each step all-reduces the flag (max) on a CPU gloo group,
    asynchronously, and uses the result one step later: no rank waits for its GPU. A second
    signal stops at once, the default way."""

    def __init__(self, world):
        self.world, self.received, self.previous = world, 0, {}
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.flag, self.pending = None, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal.signal's rule
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self.pending is not None:
            self.pending.wait()                    # every rank launched it: it completes
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def agreed(self):
        """Call once per step on every rank -> the signal all ranks stop on now (0: go on)."""
        if self.world == 1:
            return self.received
        signum = 0
        if self.pending is not None:
            self.pending.wait()
            signum = int(self.flag.item())         # a CPU tensor: no device sync
        self.flag = torch.tensor([self.received], dtype=torch.int64)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group,
                                       async_op=True)
        return signum


# ---- One optimizer step -----------------------------------------------------------------------
class LossModule(nn.Module):
    """DDP syncs the gradients of what ran through its forward(), so forward = the model's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


class Diverged(UserError):
    """A non-finite loss or gradient: the run stops (exit 2 via data.run_cli) and saves nothing."""


def pick_precision(choice, device):
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
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        # RECIPE s6: AdamW (0.9, 0.999); the fused kernel on CUDA (unfused it is ~26% of a step)
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), fused=device.type == "cuda")
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
        self.fn = self.ddp or LossModule(model)
        if args.compile:
            self.fn = torch.compile(self.fn)
        # running sums on the device, read at flush(): (loss sum, steps) of the log window and epoch
        self.window = torch.zeros(2, device=device)
        self.epoch = torch.zeros(2, device=device)
        self.first_bad_step = torch.tensor(math.inf, device=device)   # inf: none yet
        self.first_bad_gnorm = torch.tensor(0.0, device=device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self, micro, step, lr):
        """micro: this rank's accum (images, labels) micro-batches of optimizer step `step`."""
        for group in self.opt.param_groups:
            group["lr"] = lr                       # set every step from the pure schedule: exact resume
        accum, total = len(micro), 0.0
        for a, (x, y) in enumerate(micro):
            # the noise (t, eps) of global micro-batch k = rank x accum + a of step s is seeded by
            # (seed, s, k): the same whichever rank or accumulation step computes it
            torch.manual_seed(mix_seed(self.args.seed, 3, step, self.rank * accum + a))
            x = data.batch_to_images(x, self.device)          # --decode gpu decodes here
            y = y.to(self.device, non_blocking=True)
            sync_now = self.ddp is None or a == accum - 1
            with contextlib.nullcontext() if sync_now else self.ddp.no_sync():
                with self.autocast():
                    loss = self.fn(x, y)           # mean over the micro-batch
                # / accum, and DDP averages the ranks: the mean over the global batch
                self.backward(loss / accum)
            total = total + loss.detach().float()
        self.update()
        if self.ema is not None:
            # the decay warms up as (1 + s) / (10 + s): a short run's EMA is not mostly its init
            decay = min(self.args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - decay)
        mean = total / accum
        self.window += torch.stack([mean, torch.ones_like(mean)])
        self.epoch += torch.stack([mean, torch.ones_like(mean)])
        self.last_gnorm_check(mean, step)

    def backward(self, loss):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def update(self):
        """Unscale, clip, step, zero: the optimizer half of step()."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        self.gnorm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]).float()
        if self.args.clip_grad:
            nn.utils.clip_grads_with_norm_(self.params, self.args.clip_grad, self.gnorm)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def last_gnorm_check(self, mean, step):
        # fp16: an inf gradient now and then is normal (GradScaler skips that step); else divergence
        finite = torch.isfinite(mean) & (torch.isfinite(self.gnorm) | (self.scaler is not None))
        first = ~finite & torch.isinf(self.first_bad_step)
        self.first_bad_step = torch.where(first, torch.full_like(mean, step + 1), self.first_bad_step)
        self.first_bad_gnorm = torch.where(first, self.gnorm, self.first_bad_gnorm)

    def flush(self, lr_fn, epoch_too=False):
        """The only host sync: all-reduce the sums -> (window loss, epoch loss or None); raises
        Diverged if a loss or gradient was non-finite."""
        sums, bad = torch.cat([self.window, self.epoch]), self.first_bad_step.clone()
        if self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        window_loss, window_steps, epoch_loss, epoch_steps = sums.tolist()
        bad_step = bad.item()
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
        return {"model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def restore(self, ckpt):
        load_weights(self.model, ckpt["model"])
        if self.ema is not None:
            load_weights(self.ema, ckpt["ema"] or ckpt["model"], "checkpoint EMA")
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


# ---- Outputs: log, checkpoints, grids ---------------------------------------------------------
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
        data.atomic_write(path, lambda tmp: data.write_lines(tmp, kept))

    def write(self, record):
        if not self.active:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise data.write_error(e, self.path) from None


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
        return data.save_torch(ckpt, latest)
    data.save_torch(ckpt, kept)
    return data.atomic_write(latest, lambda tmp: link_or_copy(kept, tmp), data.nbytes(ckpt))


@torch.no_grad()
def save_grid(model, x, path, engine, seed):
    """Rows: clean images, then for each t in GRID_T a noised row and the model's denoised row."""
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), engine.autocast():
        torch.manual_seed(seed)                    # the same noise every time: grids compare
        rows = [x[:, :3]] + [r for t in GRID_T for r in model.denoise(x, t)]   # DiT: false colour
    model.train()
    grid = torch.cat([r.float() for r in rows]).clamp(-1, 1) * 0.5 + 0.5
    if grid.shape[-1] < 96:                        # small images: a nearest upscale, readable
        grid = nn.functional.interpolate(grid, scale_factor=96 // grid.shape[-1], mode="nearest")
    return data.atomic_write(path, lambda tmp: torchvision.utils.save_image(
        grid, tmp, format="png", nrow=len(x), padding=2, pad_value=1.0))


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
                            f"start over in another --output-dir, or pass --overwrite to replace it")
        return None
    if args.overwrite:
        raise UserError("--overwrite starts over and --resume continues: pass one of them")
    if args.resume == "auto":
        return latest if os.path.isfile(latest) else None
    return args.resume


def check_resume(ckpt, args, world, keys=None):
    """--resume continues the same run: every flag that fixes the data order, the schedule or the
    model must be as saved (the model config is compared as a whole in train()); the safe ones
    (RESUME_MAY_CHANGE) may change. -> the changed safe flags, "--flag old -> new" each."""
    saved = {"decode": "pil", **ckpt["args"]}    # checkpoints from before --decode: pil
    now = vars(args)
    keys = keys or [k for k in now if k in saved and k not in MODEL_ARGS]
    wrong = [k for k in keys if k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    layout = (ckpt.get("world", world) * saved.get("accum_iter", args.accum_iter), world * args.accum_iter)
    problems = [f"the checkpoint was trained with --{k.replace('_', '-')} {saved[k]}, this run "
                f"asks for {now[k]}" for k in wrong]
    if layout[0] != layout[1]:
        problems.append(f"the checkpoint was trained with world x --accum-iter = {layout[0]}, this "
                        f"run has {layout[1]} (the micro-batch layout fixes the noise)")
    if problems:
        raise UserError(f"--resume: {'; '.join(problems)}. Pass the same values (a longer run is a "
                        f"new run: the cosine schedule depends on --epochs)")
    return [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in keys
            if k in RESUME_MAY_CHANGE and k != "resume" and saved[k] != now[k]]


# ---- Benchmark --------------------------------------------------------------------------------
def benchmark(args, rank, world, device):
    """--benchmark N: the real training step (same Engine) on random data: img/s, FLOPs, MFU, memory."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, None, **model_overrides(args)).to(device)
    cfg, micro_size = model.config, args.batch_size // (world * args.accum_iter)
    engine, cuda = Engine(model, args, rank, world, device), device.type == "cuda"
    if cfg.get("input") == "latents":
        shape = (cfg.get("latent_channels", 3), cfg["latent_size"], cfg["latent_size"])
    else:
        shape = (3, cfg["img_size"], cfg["img_size"])
    x = torch.rand(micro_size, *shape, device=device) * 2 - 1
    micro = [(x, torch.zeros(micro_size, dtype=torch.long, device=device))] * args.accum_iter
    warmup = 10 if args.compile else 3             # compile: 2 graphs
    for i in range(warmup + args.benchmark):
        if i == warmup:                            # synced at both ends of the timed steps
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        engine.step(micro, i, 1e-4)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    ips, flops = args.benchmark * args.batch_size / secs, model.train_flops_per_image()
    tflops = ips * flops / world / 1e12            # per device
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in name), None)
    res = {"kind": "benchmark", "model": args.model, "img_size": cfg["img_size"],
           "precision": engine.prec, "compile": bool(args.compile), "world": world,
           "global_batch": args.batch_size, "steps": args.benchmark,
           "step_s": round(secs / args.benchmark, 4), "img_per_s": round(ips, 2),
           "train_gflops_per_img": round(flops / 1e9, 2), "tflops_per_device": round(tflops, 3),
           "peak_tflops": peak, "mfu": round(tflops / peak, 4) if peak else None, "device": name,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None}
    if rank == 0:
        mfu = res["mfu"] if peak else "n/a (give --peak-tflops)"
        print(f"[benchmark] {res['img_per_s']} img/s, {res['train_gflops_per_img']} GFLOPs/img, "
              f"{res['tflops_per_device']} TFLOP/s per device, MFU {mfu}")
        print(json.dumps(res), flush=True)
    return res


# ---- Training ---------------------------------------------------------------------------------
def main(args):
    rank, world, device = setup_distributed()
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def print_settings(args, model, engine, world, n_images, spe, last, base_lr, start):
    """The effective settings in one block (as MAE prints them): what this run really does."""
    cfg = model.config
    latent = ""
    if "latent_dim" in cfg:
        latent = (f", latent d = {cfg['latent_dim']}, norm {cfg['latent_norm']}, "
                  f"scale {cfg['latent_scale']:g}")
    micro = args.batch_size // (world * args.accum_iter)
    lines = [
        f"model       {cfg['name']} ({cfg['family']}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params, {cfg['img_size']} px, patch {cfg['patch_size']}{latent}",
        f"data        {args.dataset}: {n_images} train images, aug {args.aug}",
        f"batch       global {args.batch_size} = {world} rank(s) x accum {args.accum_iter} x "
        f"micro-batch {micro}; {spe} steps per epoch",
        f"lr          base {base_lr:.4g} ({'--lr' if args.lr is not None else f'--blr {args.blr:g} x batch / 256'})"
        f", warmup {args.warmup_epochs:g} epochs ({round(args.warmup_epochs * spe)} steps), cosine "
        f"to {args.min_lr:g} over {args.epochs:g} epochs",
        f"steps       {start} -> {last}" + (f" (--max-steps {args.max_steps})" if args.max_steps else ""),
        f"ema         {args.ema:g}" if args.ema else "ema         off",
        f"precision   {engine.prec}{', compiled' if args.compile else ''}",
        f"output      {args.output_dir}",
    ]
    print("[pretrain] effective settings\n  " + "\n  ".join(lines), flush=True)


def get_pca(args, cfg, rank, world, device, train_base):
    """--pca FILE, or a fit on a sample of the train set by rank 0 (the others wait, then load it)."""
    path = args.pca or os.path.join(args.output_dir, "pca.pt")
    fix = "fit one with tokenizer_pca.py, or drop --pca to fit one here"
    if args.pca and not os.path.isfile(path):
        raise UserError(f"--pca file {path} does not exist; {fix}")
    if not args.pca and rank == 0:
        # RECIPE s2: fitted on DiT center crops (as tokenizer_pca.py does), even for rrc runs
        fit_ds = train_base
        if args.aug != "center":
            center = data.build_transform("center", cfg["img_size"])
            fit_ds = data.build_dataset(args, "train", center, decode_gpu_ok=True)
        print(f"[pca] fitting on {args.pca_images} train images (RECIPE s2) -> {path}", flush=True)
        pca = fit_pca(data.decoded(fit_ds), cfg["patch_size"], args.pca_images,
                      center=args.pca_center, seed=args.seed, device=device,
                      num_workers=args.num_workers, meta={"dataset": args.dataset})
        data.save_torch(pca.to_dict(), path)
    if not args.pca and world > 1:
        dist.barrier()                             # one node, or an OUTPUT_DIR all nodes share
    pca = PatchPCA.from_dict(data.load_torch(path, "--pca file", fix))
    if pca.patch_size != cfg["patch_size"] or pca.channels != cfg.get("in_chans", 3):
        raise UserError(f"the PCA {args.pca or ''} has {pca.patch_size}px x {pca.channels}ch patches "
                        f"but --model {args.model} uses {cfg['patch_size']}px x "
                        f"{cfg.get('in_chans', 3)}ch; refit it")
    if pca.img_size != cfg["img_size"] and rank == 0:   # the basis is per patch: any size works
        print(f"[pca] note: fitted on {pca.img_size}px images, training at {cfg['img_size']}px")
    return pca


def check_layout(args, world):
    if args.batch_size % (world * args.accum_iter):
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be a positive "
                        f"multiple of world size {world} x --accum-iter {args.accum_iter}")


def cap_batch(args, n, world, lead):
    """A default batch (the paper's 2048) on a small set becomes one global batch of the whole
    set (a multiple of world x accum), so the defaults run on any data; said, not silent."""
    layout = world * args.accum_iter
    if args.batch_size <= n:
        return
    capped = n // layout * layout
    if capped == 0:
        raise UserError(f"the training set ({n} images) is smaller than world size {world} x "
                        f"--accum-iter {args.accum_iter}")
    if lead:
        print(f"[pretrain] note: --batch-size {args.batch_size} exceeds the training set ({n} "
              f"images); using a global batch of {capped}", flush=True)
    args.batch_size = capped


def train(args, rank, world, device):
    t_start, lead = time.time(), rank == 0
    check_layout(args, world)
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls and convolutions on CUDA
    torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):                     # the config alone, nothing allocated
        cfg = build_model(args.model, None, **model_overrides(args)).config
    args.input_size = cfg["img_size"]
    if args.benchmark:
        return benchmark(args, rank, world, device)
    out = args.output_dir
    latest, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")
    data.check_writable_dir(out, "--output-dir")
    source = resume_source(args, latest)
    ckpt = load_checkpoint(source) if source else None
    if ckpt is not None:
        check_resume(ckpt, args, world, [k for k in vars(args) if k in ckpt["args"]
                                         and k not in MODEL_ARGS and k != "batch_size"])
    if lead:
        stale = data.clean_stale_temps(out, ["checkpoint", "pca.pt", "log.jsonl", "grid"])
        if stale:
            print(f"[pretrain] removed {len(stale)} temporary file(s) a killed run left: "
                  f"{', '.join(stale[:4])}", flush=True)
    if cfg.get("input") == "latents" and args.decode == "gpu":
        raise UserError("--decode gpu decodes JPEG files, but this model reads --latents-file; "
                        "drop --decode gpu")
    if cfg.get("input") == "latents":
        train_base = dit_baseline.make_latent_dataset(args.latents_file)
    else:
        transform = data.build_transform(args.aug, args.input_size)
        train_base = data.build_dataset(args, "train", transform, decode_gpu_ok=True)
    cap_batch(args, len(train_base), world, lead)
    changed = check_resume(ckpt, args, world) if ckpt is not None else []
    spe = len(train_base) // args.batch_size       # optimizer steps per epoch (drop last)
    if cfg.get("input") == "latents":
        pca = None                                 # a DiT on the user's latents: no PCA
    elif ckpt is not None:
        pca = PatchPCA.from_dict(ckpt["pca"])      # the run's own basis, never refitted
    else:
        pca = get_pca(args, cfg, rank, world, device, train_base)
    torch.manual_seed(args.seed)                   # the same init on every rank
    overrides = model_overrides(args, num_classes=data.num_classes(train_base))
    model = build_model(args.model, pca, **overrides).to(device)
    engine, step = Engine(model, args, rank, world, device), 0
    if ckpt is not None:
        ignore = ("grad_checkpoint",)              # recomputing activations changes no number
        same = {k: v for k, v in ckpt["model_config"].items() if k not in ignore}
        if same != {k: v for k, v in model.config.items() if k not in ignore}:
            raise UserError(f"--resume: the checkpoint's model {ckpt['model_config']} differs from "
                            f"this run's {model.config}; pass the same model flags")
        engine.restore(ckpt)
        torch.set_rng_state(ckpt["rng"]["torch"])
        step = ckpt["step"]
    sampler = GlobalBatchSampler(len(train_base), args.batch_size, world, rank, args.accum_iter,
                                 args.seed)
    indexed = Indexed(train_base, args.seed)
    loader = torch.utils.data.DataLoader(
        indexed, batch_sampler=sampler, num_workers=args.num_workers,
        collate_fn=data.collate,                   # --decode gpu: a batch of JPEG bytes
        worker_init_fn=ignore_stop_signals, pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0)
    last = min(max(1, round(args.epochs * spe)), args.max_steps or math.inf)
    base_lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256   # RECIPE s6

    def lr_fn(s):
        return lr_at(s, spe, base_lr, args.warmup_epochs, args.epochs, args.min_lr)

    if lead:
        print_settings(args, model, engine, world, len(train_base), spe, last, base_lr, step)
        if ckpt is not None:
            print(f"[resume] {source} at step {step}; changed: {', '.join(changed) or 'nothing'} "
                  f"(the data order, schedule and model are the checkpoint's)", flush=True)
        warmup_steps = args.warmup_epochs * spe
        if warmup_steps >= last:
            print(f"[pretrain] warning: the warmup ({warmup_steps:g} steps) is as long as the run "
                  f"({last} steps): the lr never leaves warmup and peaks at {lr_fn(last - 1):.3g}, "
                  f"not {base_lr:.3g}; shorten --warmup-epochs", flush=True)
    resume_record = None
    if ckpt is not None:
        resume_record = {"kind": "resume", "step": step, "from": source, "changed": changed,
                         "seconds": 0.0}
    log = RunLog(log_path, lead, resume_record)
    if ckpt is not None and lead and step % spe == 0:
        # a kill in an older version's save could lose a kept epoch copy: restore it
        kept = os.path.join(out, f"checkpoint-{step // spe:04d}.pt")
        if (step // spe) % args.save_every == 0 and not os.path.exists(kept):
            data.atomic_write(kept, lambda tmp: link_or_copy(source, tmp))
    first_images = [indexed[(0, i)] for i in range(min(8, len(train_base)))]
    grid_x = data.batch_to_images(data.collate(first_images)[0], device)
    return run_loop(args, engine, loader, sampler, log, lr_fn, step, last, spe, world, grid_x,
                    latest, t_start, saved_at=step if ckpt is not None else None)


class LoopClock:
    """Wall time and step at the previous record of each kind: img/s over that interval."""

    def __init__(self, step):
        now = time.time()
        self.marks = {"log": (now, step), "epoch": (now, step)}

    def since(self, kind, step):
        (t0, s0), now = self.marks[kind], time.time()
        self.marks[kind] = (now, step)
        return step - s0, now - t0


def run_loop(args, engine, loader, sampler, log, lr_fn, step, last, spe, world, grid_x, latest,
             t_start, saved_at):
    """Steps from `step` to `last`: logs, kept checkpoints, grids; a signal stops it cleanly."""
    lead, out, model = engine.rank == 0, args.output_dir, engine.model
    clock, final_loss = LoopClock(step), None

    def record(kind, loss):
        steps, secs = clock.since(kind, step)
        rec = {"kind": kind, "step": step, "epoch": round(step / spe, 4), "loss": loss,
               "lr": lr_fn(step - 1), "img_per_s": round(steps * args.batch_size / max(secs, 1e-9), 2),
               "seconds": round(time.time() - t_start, 2), "interval_seconds": round(secs, 2),
               "gpu_max_mem_gb": None}
        if engine.device.type == "cuda":
            rec["gpu_max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if kind == "log":
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", img_s=rec["img_per_s"])
        log.write(rec)

    def save(epoch_end):                           # right after a flush: weights known finite
        if lead:
            epoch = step // spe
            ck = {**engine.state(), "step": step, "epoch": epoch, "model_config": model.config,
                  "pca": model.pca.to_dict(),
                  "args": {k: v for k, v in vars(args).items()
                           if isinstance(v, (int, float, str, bool, type(None)))},
                  "world": world, "rng": {"torch": torch.get_rng_state()}, "version": 1}
            kept = os.path.join(out, f"checkpoint-{epoch:04d}.pt") if epoch_end else None
            try:
                save_checkpoint(ck, latest, kept)
            except UserError as e:                 # a full disk: say what is still safe
                good = f"{latest} still holds step {saved_at}"
                if saved_at is None:
                    good = "this run has no checkpoint yet"
                raise UserError(f"{e}; {good}") from None
        return step

    signum = 0
    try:
        with StopSignal(world) as stop, data.progress(total=last, initial=step, disable=not lead,
                                                      unit="step") as bar:
            while step < last and not signum:
                sampler.set_epoch(step // spe, step % spe)   # mid-epoch resume: skip what was seen
                batches = iter(loader)
                for _ in range(min(spe - step % spe, last - step)):
                    engine.step([next(batches) for _ in range(args.accum_iter)], step, lr_fn(step))
                    step += 1
                    bar.update(1)
                    if step % args.log_every == 0:
                        final_loss = engine.flush(lr_fn)[0]
                        record("log", final_loss)
                    signum = stop.agreed()
                    if signum:
                        break
                del batches
                epoch_end = step % spe == 0        # else: the end of the run mid-epoch, or a stop
                window, epoch_loss = engine.flush(lr_fn, epoch_too=epoch_end)
                if window is not None:
                    final_loss = window
                    record("log", window)
                if epoch_end:
                    record("epoch", epoch_loss)
                kept_epoch = epoch_end and (step // spe) % args.save_every == 0
                if not epoch_end or kept_epoch or step >= last or signum:
                    saved_at = save(epoch_end)
                due = epoch_end and ((step // spe) % args.grid_every == 0 or step >= last)
                if lead and due:
                    save_grid(model, grid_x, os.path.join(out, f"grid-{step // spe:04d}.png"),
                              engine, args.seed)
    except Diverged as e:
        kept = f"{latest} (step {saved_at}) is untouched"
        if saved_at is None:
            kept = "no checkpoint was written"
        raise Diverged(f"{e}; stopped without saving: {kept}. Lower --lr/--blr or set --clip-grad") from None
    if signum:
        name = signal.Signals(signum).name
        log.write({"kind": "stopped", "step": step, "signal": name,
                   "seconds": round(time.time() - t_start, 2)})
        raise data.Interrupted(f"[pretrain] stopped by {name} at step {step} of {last}: saved "
                               f"{latest}; continue with the same command and --resume auto", signum)
    if not lead:
        return None
    grid = save_grid(model, grid_x, os.path.join(out, "grid.png"), engine, args.seed)
    res = {"final_loss": final_loss, "steps": step, "seconds": round(time.time() - t_start, 2),
           "checkpoint": latest, "log": log.path, "grid": grid}
    print(f"[pretrain] done. {grid}: rows = clean, then noised / denoised at t = "
          f"{', '.join(map(str, GRID_T))}")
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    data.run_cli(main, get_args_parser())
