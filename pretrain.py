"""Pre-train an l-DAE (RECIPE s3, s4, s6) -- or a DiT baseline row -- on a CPU, one GPU, or many under torchrun.

Quick start (CPU, synthetic shapes, ~1 min; writes out/tiny/{checkpoint.pt,log.jsonl,grid.png,pca.pt}):
  python pretrain.py --model vit_tiny --output-dir out/tiny
  (the small models' defaults: SMALL_DEFAULTS below and d = 8, whitened latents in ldae.MODELS)
Same with DDP (2 CPU processes over gloo; same losses as one process with --accum-iter 2):
  torchrun --nproc_per_node=2 pretrain.py --model vit_tiny --output-dir out/tiny_ddp
ImageNet, final ViT-B l-DAE (RECIPE s6: batch 2048, blr 1e-4, 100 warmup of 400 epochs, random crops):
  torchrun --nproc_per_node=8 pretrain.py --model vit_b --dataset imagefolder --data-path IMNET \
      --batch-size 2048 --epochs 400 --warmup-epochs 100 --aug rrc --pca-images 10000 --output-dir out/vit_b
  (add --resume auto to continue a killed run from out/vit_b/checkpoint.pt, bit-identically; add
  --decode gpu to decode the JPEGs on the GPU when the CPUs cannot keep up: see data.py)
A paper row: python pretrain.py --preset t3_ldae ...   (dit_baseline.PRESETS; explicit flags win)
Speed:       python pretrain.py --model vit_b --benchmark 20 --batch-size 256 [--compile]   (img/s, MFU)
             python tests/bench_vit_step.py   (CPU: our vit_b step vs a plain torchvision ViT)

Determinism: data order, augmentation and noise are pure functions of (seed, epoch, index) and (seed,
step, micro-batch) (GlobalBatchSampler, Indexed, Engine.step), so resume is exact and any layout with the
same world*accum (8 GPUs, or 1 GPU with --accum-iter 8) sees the same examples and noise.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from tqdm import tqdm

import data
import dit_baseline
import ldae
from data import UserError
from tokenizer_pca import PatchPCA, fit_pca

FAMILIES = {"ldae": ldae, "dit": dit_baseline}
ALL_MODELS = {**ldae.MODELS, **dit_baseline.MODELS}
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # bf16 dense
GRID_T = (100, 300, 500, 700, 900)
# Training defaults of the CPU-sized models (32 px), measured to learn on the synthetic set and
# Fashion-MNIST (README, Reproduction); every other model keeps the paper's (RECIPE s6). They sit
# under explicit flags and replace a --preset's ImageNet-sized batch, lr and length.
_SMALL = dict(batch_size=64, lr=4e-3, epochs=10, warmup_epochs=1, ema=0.999, pca_images=500,
              save_every=5, grid_every=5, log_every=10, input_size=None)   # None: the model's 32 px
SMALL_DEFAULTS = {name: _SMALL for name in ("vit_tiny", "vit_small", "dit_tiny_1", "dit_tiny_2")}


def build_model(name, pca=None, **overrides):
    """Contract: the family's build_model with only the flags it lists in MODEL_FLAGS (None = default)."""
    if name not in ALL_MODELS:
        raise UserError(f"unknown --model {name!r}; choose from {', '.join(sorted(ALL_MODELS))}")
    fam = ldae if name in ldae.MODELS else dit_baseline
    return fam.build_model(name, pca, **{k: v for k, v in overrides.items() if k in fam.MODEL_FLAGS and v is not None})


def load_checkpoint(path):
    """-> checkpoint dict, read with weights_only=True. UserError if missing or not one of ours."""
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint.pt written by pretrain.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled objects
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in ("model", "model_config", "pca", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a pretrain.py checkpoint (no {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt, weights="ema", device="cpu"):
    """The checkpoint's exact model (its config + PCA basis) with its EMA or raw weights, strictly."""
    cfg = dict(ckpt["model_config"])
    fam, name = cfg.pop("family", "ldae"), cfg.pop("name")
    cfg.setdefault("latent_norm", "none")      # checkpoints from before --latent-norm
    if fam not in FAMILIES:
        raise UserError(f"checkpoint model family {fam!r} is unknown; have {sorted(FAMILIES)}")
    sd = ckpt.get("ema") if weights == "ema" else ckpt["model"]
    if sd is None:
        print("[ckpt] no EMA weights in this checkpoint (trained with --ema 0): using the raw weights")
    model = FAMILIES[fam].build_model(name, PatchPCA.from_dict(ckpt["pca"]), **cfg)
    try:
        res = model.load_state_dict(sd if sd is not None else ckpt["model"], strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"checkpoint weights do not fit its model config: {str(e)[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        raise UserError(f"checkpoint does not match the model: missing keys {res.missing_keys[:8]}, "
                        f"unexpected keys {res.unexpected_keys[:8]}")
    return model.to(device).eval()


class PresetParser(argparse.ArgumentParser):
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
            names = ", ".join(sorted(dit_baseline.PRESETS))
            self.error(f"unknown --preset {preset!r}; choose from {names}")
        if preset:
            self.set_defaults(**dit_baseline.PRESETS[preset])
            ns, rest = super().parse_known_args(args, copy.copy(namespace))
        small = SMALL_DEFAULTS.get(getattr(ns, "model", None))
        if preset or small:
            self.set_defaults(**(small or {}))
            ns, rest = super().parse_known_args(args, namespace)
        return ns, rest


def get_args_parser():
    p = PresetParser("l-DAE pre-training (RECIPE s3, s4, s6)")
    a = p.add_argument
    a("--model", default="vit_b", help=f"one of {', '.join(sorted(ALL_MODELS))}")
    a("--preset", default=None, help="a dit_baseline.PRESETS row (sets defaults; explicit flags win)")
    a("--epochs", type=float, default=400, help="may be fractional")
    a("--max-steps", type=int, default=None, help="stop (and save) after this many optimizer steps")
    a("--batch-size", type=int, default=2048, help="GLOBAL batch over ranks and accumulation steps")
    a("--accum-iter", type=int, default=1, help="micro-batches per optimizer step and rank")
    a("--blr", type=float, default=1e-4, help="lr = blr * batch_size / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--min-lr", type=float, default=0.0)
    a("--warmup-epochs", type=float, default=100)
    a("--weight-decay", type=float, default=0.0, help="paper: 0 (if > 0: matrices only, as MAE)")
    a("--ema", type=float, default=0.9999, help="EMA decay (warmed up as (1+step)/(10+step)), 0 = off")
    a("--clip-grad", type=float, default=None, help="max grad norm (default: no clipping)")
    a("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto: bf16 on CUDA if supported, else fp16 + GradScaler; fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the loss path")
    a("--aug", default="center", choices=["center", "rrc"], help="ablations: center; final models: rrc")
    a("--pca", default=None, help="PatchPCA file; default: fit on the train set, save OUTPUT_DIR/pca.pt")
    a("--pca-images", type=int, default=1000, help="images for that fit (ImageNet: 10000+)")
    a("--pca-center", action="store_true", help="subtract the mean patch in that fit")
    g = p.add_argument_group("model flags (default None = the registry's value; see ldae/dit_baseline MODEL_FLAGS)")
    for flag, kw in [("latent-dim", dict(type=int)), ("latent-scale", dict(type=float)),
                     ("latent-norm", dict(choices=["none", "global", "whiten"])),
                     ("cond-ratio", dict(type=float)),
                     ("residual-weight", dict(type=float)), ("noise", dict(choices=["multi", "single"])),
                     ("single-sigma", dict(type=float)), ("target", dict(choices=["original", "projected", "latent"])),
                     ("patch-size", dict(type=int)), ("grad-checkpoint", dict(action="store_true")),
                     ("schedule", {}), ("prediction", {}), ("class-cond", {}), ("dit-input", {}), ("latents-file", {})]:
        g.add_argument("--" + flag, default=None, **kw)
    a("--seed", type=int, default=0)
    a("--output-dir", default="out")
    a("--resume", default=None, help="'auto' (OUTPUT_DIR/checkpoint.pt if present) or a checkpoint path")
    a("--save-every", type=int, default=20, help="epochs between checkpoints (and one at the end)")
    a("--log-every", type=int, default=50, help="steps between log lines (the only host syncs)")
    a("--grid-every", type=int, default=20, help="epochs between denoising grids (and one at the end)")
    a("--benchmark", type=int, default=0, metavar="N", help="time N steps on random data: img/s, MFU, memory")
    a("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: known-GPU table)")
    data.add_data_args(p)
    p.set_defaults(input_size=None)   # None: the model's img_size (vit_tiny: 32, vit_b: 256)
    return p


def lr_at(step, steps_per_epoch, base_lr, warmup_epochs, epochs, min_lr=0.0):
    """RECIPE s6: linear warmup then half-cycle cosine, per iteration on the fractional epoch (as MAE)."""
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return base_lr * e / warmup_epochs
    frac = min(1.0, (e - warmup_epochs) / max(1e-12, epochs - warmup_epochs))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


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
    world*accum contiguous micro-batches (rank r owns k = r*accum + a) and an epoch can start at any
    step. Permutation = f(seed, epoch); the incomplete last global batch is dropped."""

    def __init__(self, n, global_batch, world, rank, accum, seed):
        self.n, self.G, self.rank, self.accum, self.seed = n, global_batch, rank, accum, seed
        self.m = global_batch // (world * accum)                  # micro-batch size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, 2, self.epoch)))
        for s in range(self.start, self.n // self.G):
            for a in range(self.accum):
                lo = s * self.G + (self.rank * self.accum + a) * self.m
                yield [(self.epoch, int(i)) for i in perm[lo:lo + self.m]]


class LossModule(nn.Module):
    """DDP syncs gradients of what ran through its forward(), so forward = the model's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


def setup_distributed():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: NCCL on GPUs, gloo on CPU; otherwise one plain process."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()) if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():   # long timeout: rank 0 may fit the PCA while others wait
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=60))
    return rank, world, device


def model_overrides(args, **extra):
    """Every flag is offered; build_model keeps the family's MODEL_FLAGS. --input-size -> img_size."""
    flags = set(ldae.MODEL_FLAGS) | set(dit_baseline.MODEL_FLAGS)
    return {**{k: v for k, v in vars(args).items() if k in flags}, "img_size": args.input_size, **extra}


def get_pca(args, cfg, rank, world, device, train_base):
    """--pca FILE, or a fit on a sample of the train set by rank 0 (the others wait, then load it)."""
    if cfg.get("input") == "latents":
        return None                                       # DiT on user latents: no PCA involved
    path = args.pca or os.path.join(args.output_dir, "pca.pt")
    if args.pca and not os.path.isfile(path):
        raise UserError(f"--pca file {path} does not exist; fit one with tokenizer_pca.py or drop --pca")
    if not args.pca and rank == 0:   # RECIPE s2: fit on DiT center crops (as tokenizer_pca.py), not rrc
        fit_ds = train_base if args.aug == "center" else data.build_dataset(
            args, "train", data.build_transform("center", cfg["img_size"]), decode_gpu_ok=True)
        print(f"[pca] fitting on {args.pca_images} train images (RECIPE s2) -> {path}", flush=True)
        fit_pca(data.decoded(fit_ds), cfg["patch_size"], args.pca_images, center=args.pca_center, seed=args.seed,
                device=device, num_workers=args.num_workers, meta={"dataset": args.dataset}).save(path)
    if not args.pca and world > 1:
        dist.barrier()                                    # (one node, or a shared OUTPUT_DIR)
    try:
        pca = PatchPCA.load(path)
    except Exception as e:
        raise UserError(f"cannot read --pca file {path} ({type(e).__name__}: {str(e)[:200]})") from None
    if pca.patch_size != cfg["patch_size"] or pca.channels != cfg.get("in_chans", 3):
        raise UserError(f"the PCA {args.pca or ''} has {pca.patch_size}px x {pca.channels}ch patches but --model "
                        f"{args.model} uses {cfg['patch_size']}px x {cfg.get('in_chans', 3)}ch; refit it")
    if pca.img_size != cfg["img_size"] and rank == 0:     # the basis is per patch: any image size works
        print(f"[pca] note: fitted on {pca.img_size}px images, training at {cfg['img_size']}px")
    return pca


class Diverged(UserError):
    """A non-finite loss or gradient: the run stops (exit 2 via data.run_cli) and saves nothing."""


class Engine:
    """Model + EMA (RECIPE s6: our choice) + AdamW + precision + DDP. step() = one optimizer step with no
    host sync inside: losses and the first bad step stay on the device until flush()."""

    def __init__(self, model, args, rank, world, device):
        self.model, self.args, self.rank, self.world, self.device = model, args, rank, world, device
        prec = args.precision if args.precision != "auto" else "fp32" if device.type != "cuda" \
            else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        self.prec, self.amp_dtype = prec, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[prec]
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), fused=device.type == "cuda")  # RECIPE s6
        self.scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None
        self.ema = copy.deepcopy(model).float().eval().requires_grad_(False) if args.ema > 0 else None  # fp32
        self.ema_params = [q for q, p in zip(self.ema.parameters(), model.parameters()) if p.requires_grad] \
            if self.ema else None
        fn = LossModule(model)
        self.ddp = nn.parallel.DistributedDataParallel(fn, device_ids=[device] if device.type == "cuda" else None) \
            if world > 1 else None             # compile(DDP(m)): DDPOptimizer splits graphs at bucket borders
        self.fn = torch.compile(self.ddp or fn) if args.compile else self.ddp or fn
        self.acc = torch.zeros(4, device=device)   # sums: window loss, window steps, epoch loss, epoch steps
        self.bad = torch.tensor([math.inf, 0.0], device=device)   # first bad step (inf: none), its grad norm

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self, micro, step, lr):
        """micro: this rank's accum (images, labels) micro-batches of optimizer step `step`."""
        for g in self.opt.param_groups:
            g["lr"] = lr                       # set every step from the pure schedule: exact on resume
        accum, total = len(micro), 0.0
        for a, (x, y) in enumerate(micro):
            # the noise (t, eps) of global micro-batch k = rank * accum + a of step s is seeded by
            # (seed, s, k): the same whichever rank / accumulation step runs it
            torch.manual_seed(mix_seed(self.args.seed, 3, step, self.rank * accum + a))
            x, y = data.batch_to_images(x, self.device), y.to(self.device, non_blocking=True)   # --decode gpu
            with contextlib.nullcontext() if self.ddp is None or a == accum - 1 else self.ddp.no_sync():
                with self.autocast():
                    loss = self.fn(x, y)               # scalar: mean over the micro-batch
                scaled = loss / accum                  # DDP then averages ranks: mean over the global batch
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total = total + loss.detach().float()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        gnorm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]).float()
        if self.args.clip_grad:
            nn.utils.clip_grads_with_norm_(self.params, self.args.clip_grad, gnorm)
        self.scaler.step(self.opt) if self.scaler else self.opt.step()
        self.scaler.update() if self.scaler else None
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:   # decay warms up as (1 + s) / (10 + s) -> --ema, so a short run's EMA
            decay = min(self.args.ema, (1 + step) / (10 + step))      # is not mostly the random init
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - decay)
        mean = total / accum
        self.acc += torch.stack([mean, torch.ones_like(mean)]).repeat(2)
        # fp16: an inf gradient now and then is normal (GradScaler skips that step); else it is divergence
        ok = torch.isfinite(mean) & (torch.isfinite(gnorm) | (self.scaler is not None))
        first = ~ok & torch.isinf(self.bad[0])
        self.bad = torch.where(first, torch.stack([torch.full_like(mean, step + 1), gnorm]), self.bad)

    def flush(self, lr_fn, epoch_too=False):
        """The only host sync: all-reduce the sums -> (window loss, epoch loss); Diverged if non-finite."""
        acc, bad = self.acc.clone(), self.bad[:1].clone()
        if self.world > 1:
            dist.all_reduce(acc)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        acc, bad_step = acc.tolist(), bad.item()
        self.acc[:4 if epoch_too else 2] = 0
        if math.isfinite(bad_step) or not all(map(math.isfinite, acc)):
            s = int(bad_step) if math.isfinite(bad_step) else None
            raise Diverged(f"non-finite loss at step {s} (lr {lr_fn(max(s or 1, 1) - 1):.3g}, "
                           f"grad norm {self.bad[1].item():.3g})")
        return (acc[0] / acc[1] if acc[1] else None), (acc[2] / acc[3] if acc[3] else None)


@torch.no_grad()
def save_grid(model, x, path, engine, seed):
    """Rows: clean images, then for each t in GRID_T a noised row and the model's denoised row."""
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), engine.autocast():
        torch.manual_seed(seed)                    # same noise every time: grids compare across epochs
        rows = [x[:, :3]] + [r for t in GRID_T for r in model.denoise(x, t)]   # (DiT latents: false colour)
    model.train()
    g = torch.cat([r.float() for r in rows]).clamp(-1, 1) * 0.5 + 0.5
    if g.shape[-1] < 96:                           # small images: nearest upscale, readable grid
        g = nn.functional.interpolate(g, scale_factor=96 // g.shape[-1], mode="nearest")
    torchvision.utils.save_image(g, path, nrow=len(x), padding=2, pad_value=1.0)
    return path


def benchmark(args, rank, world, device):
    """--benchmark N: the real training step (same Engine) on random data: img/s, FLOPs, MFU, memory."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, None, **model_overrides(args)).to(device)
    cfg, m, cuda = model.config, args.batch_size // (world * args.accum_iter), device.type == "cuda"
    engine, lat = Engine(model, args, rank, world, device), cfg.get("input") == "latents"
    C, S = (cfg.get("latent_channels", 3), cfg.get("latent_size")) if lat else (3, cfg["img_size"])
    micro = [(torch.rand(m, C, S, S, device=device) * 2 - 1, torch.zeros(m, dtype=torch.long, device=device))]
    warmup = 10 if args.compile else 3                 # compile: 2 graphs
    for i in range(warmup + args.benchmark):
        if i == warmup:                                # synced at both ends of the timed steps
            torch.cuda.synchronize() if cuda else None
            t0 = time.perf_counter()
        engine.step(micro * args.accum_iter, i, 1e-4)
    torch.cuda.synchronize() if cuda else None
    secs = time.perf_counter() - t0
    ips, flops = args.benchmark * args.batch_size / secs, model.train_flops_per_image()
    tflops, name = ips * flops / world / 1e12, torch.cuda.get_device_name(device) if cuda else "cpu"  # per device
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in name), None)
    res = {"kind": "benchmark", "model": args.model, "img_size": cfg["img_size"], "precision": engine.prec,
           "compile": bool(args.compile), "world": world, "global_batch": args.batch_size, "steps": args.benchmark,
           "step_s": round(secs / args.benchmark, 4), "img_per_s": round(ips, 2),
           "train_gflops_per_img": round(flops / 1e9, 2), "tflops_per_device": round(tflops, 3),
           "peak_tflops": peak, "mfu": round(tflops / peak, 4) if peak else None, "device": name,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None}
    if rank == 0:
        print(f"[benchmark] {res['img_per_s']} img/s, {res['train_gflops_per_img']} GFLOPs/img, {res['tflops_per_device']} "
              f"TFLOP/s per device, MFU {res['mfu'] if peak else 'n/a (give --peak-tflops)'}")
        print(json.dumps(res), flush=True)
    return res


def main(args):
    rank, world, device = setup_distributed()
    try:
        return train(args, rank, world, device)
    finally:
        dist.destroy_process_group() if dist.is_initialized() else None


def check_resume(saved, args, keys):
    """--resume continues the same run: these flags (data order, schedule) must not change."""
    for k in keys:
        if saved.get(k) != getattr(args, k):
            raise UserError(f"--resume: the checkpoint was trained with --{k.replace('_', '-')} "
                            f"{saved.get(k)}, this run asks for {getattr(args, k)}; pass the same")


def train(args, rank, world, device):
    t_start, lead = time.time(), rank == 0
    if args.batch_size <= 0 or args.accum_iter <= 0 or args.batch_size % (world * args.accum_iter):
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be a positive multiple of "
                        f"world size {world} x --accum-iter {args.accum_iter}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True      # TF32 on
    with torch.device("meta"):                                 # the config alone, nothing allocated
        cfg = build_model(args.model, None, **model_overrides(args)).config
    args.input_size = cfg["img_size"]
    if args.benchmark:
        return benchmark(args, rank, world, device)
    out, ckpt = args.output_dir, None
    ckpt_path, log_path, probe = (os.path.join(out, f) for f in ("checkpoint.pt", "log.jsonl", f".write_test_{rank}"))
    try:
        os.makedirs(out, exist_ok=True)
        open(probe, "w").close() or os.remove(probe)
    except OSError as e:
        raise UserError(f"output dir {out} is not writable ({e.strerror}); pass another --output-dir") from None
    if args.resume and (args.resume != "auto" or os.path.isfile(ckpt_path)):
        ckpt = load_checkpoint(ckpt_path if args.resume == "auto" else args.resume)
        saved = {"decode": "pil", **ckpt["args"]}              # checkpoints from before --decode: pil
        check_resume(saved, args, ("model", "seed", "dataset", "decode", "epochs", "warmup_epochs"))
    if cfg.get("input") == "latents" and args.decode == "gpu":
        raise UserError("--decode gpu decodes JPEG files, but this model reads --latents-file; drop --decode gpu")
    train_base = dit_baseline.make_latent_dataset(args.latents_file) if cfg.get("input") == "latents" else \
        data.build_dataset(args, "train", data.build_transform(args.aug, args.input_size), decode_gpu_ok=True)
    if args.batch_size > len(train_base):
        # a default batch (2048, the paper's) on a small set: one global batch of the whole set
        # (a multiple of world x accum), so the defaults run on any data; said, not silent
        capped = len(train_base) // (world * args.accum_iter) * world * args.accum_iter
        if capped == 0:
            raise UserError(f"the training set ({len(train_base)} images) is smaller than world "
                            f"size {world} x --accum-iter {args.accum_iter}")
        if lead:
            print(f"[pretrain] note: --batch-size {args.batch_size} exceeds the training set "
                  f"({len(train_base)} images); using a global batch of {capped}", flush=True)
        args.batch_size = capped
    if ckpt is not None:                                       # after the cap (saved capped)
        check_resume(saved, args, ("batch_size",))
    spe = len(train_base) // args.batch_size                   # optimizer steps per epoch (drop last)
    pca = PatchPCA.from_dict(ckpt["pca"]) if ckpt else get_pca(args, cfg, rank, world, device, train_base)
    torch.manual_seed(args.seed)                               # identical init on every rank
    model = build_model(args.model, pca, **model_overrides(args, num_classes=data.num_classes(train_base))).to(device)
    engine, step = Engine(model, args, rank, world, device), 0
    if ckpt is not None:
        if ckpt["model_config"] != model.config:
            raise UserError(f"--resume: the checkpoint's model {ckpt['model_config']} differs from this run's "
                            f"{model.config}; pass the same model flags")
        model.load_state_dict(ckpt["model"])
        if engine.ema is not None:
            engine.ema.load_state_dict(ckpt["ema"] or ckpt["model"])
        engine.opt.load_state_dict(ckpt["optimizer"])
        if engine.scaler is not None and ckpt["scaler"]:
            engine.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step = ckpt["step"]
    random.seed(args.seed + rank)     # python/numpy: offset by rank; torch is re-seeded per step / item
    np.random.seed((args.seed + rank) % 2**32)
    sampler = GlobalBatchSampler(len(train_base), args.batch_size, world, rank, args.accum_iter, args.seed)
    indexed = Indexed(train_base, args.seed)
    loader = torch.utils.data.DataLoader(indexed, batch_sampler=sampler, num_workers=args.num_workers,
                                         collate_fn=data.collate,   # --decode gpu: a batch of JPEG bytes
                                         pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    stop = min(max(1, round(args.epochs * spe)), args.max_steps or math.inf)
    base_lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256      # RECIPE s6
    lr_fn = lambda s: lr_at(s, spe, base_lr, args.warmup_epochs, args.epochs, args.min_lr)  # noqa: E731
    warmup_steps = args.warmup_epochs * spe
    if lead and warmup_steps >= stop:
        print(f"[pretrain] warning: the warmup ({warmup_steps:g} steps) is as long as the run "
              f"({stop} steps): the lr never leaves warmup and peaks at {lr_fn(stop - 1):.3g}, not "
              f"{base_lr:.3g}; shorten --warmup-epochs", flush=True)
    grid_x = data.batch_to_images(data.collate([indexed[(0, i)] for i in range(min(8, len(train_base)))])[0], device)
    if lead:
        print(f"[pretrain] {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{cfg['img_size']}px, {world} rank(s) x accum {args.accum_iter} = global batch {args.batch_size}, "
              f"lr {base_lr:.3g}, {engine.prec}, {spe} steps/epoch, step {step} -> {stop}", flush=True)
    bar = tqdm(total=stop, initial=step, disable=not lead, unit="step", dynamic_ncols=True)
    st = dict(loss=None, saved=step if ckpt else None, log=(time.time(), step), epoch=(time.time(), step))

    def log(kind, loss):   # one JSON line; img/s over the steps since the previous line of this kind
        (t0, s0), now = st[kind], time.time()
        rec = {"kind": kind, "step": step, "epoch": round(step / spe, 4), "loss": loss, "lr": lr_fn(step - 1),
               "img_per_s": round((step - s0) * args.batch_size / max(now - t0, 1e-9), 2),
               "seconds": round(now - t_start, 2), "interval_seconds": round(now - t0, 2),
               "gpu_max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None}
        st[kind] = (now, step)
        if kind == "log":
            st["loss"] = loss
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", img_s=rec["img_per_s"])
        if lead:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save(by_epoch):    # only ever right after a flush() on every rank: the weights are known finite
        st["saved"] = step
        if not lead:
            return
        ck = {"model": model.state_dict(), "ema": engine.ema.state_dict() if engine.ema else None,
              "optimizer": engine.opt.state_dict(), "scaler": engine.scaler.state_dict() if engine.scaler else None,
              "step": step, "epoch": step // spe, "model_config": model.config, "pca": model.pca.to_dict(),
              "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
              "rng": {"torch": torch.get_rng_state()}, "version": 1}
        # epoch ends also keep checkpoint-{epoch:04d}.pt; tmp file + os.replace: a crash mid-write never
        # leaves a truncated checkpoint behind
        for path in [ckpt_path] + [os.path.join(out, f"checkpoint-{step // spe:04d}.pt")] * by_epoch:
            try:
                torch.save(ck, path + ".tmp")
                os.replace(path + ".tmp", path)
            finally:
                if os.path.exists(path + ".tmp"):
                    os.remove(path + ".tmp")

    try:
        while step < stop:
            sampler.set_epoch(step // spe, step % spe)         # mid-epoch resume: skip consumed batches
            it = iter(loader)
            for _ in range(min(spe - step % spe, stop - step)):
                engine.step([next(it) for _ in range(args.accum_iter)], step, lr_fn(step))
                step += 1
                bar.update(1)
                if step % args.log_every == 0:
                    log("log", engine.flush(lr_fn)[0])
            del it
            ep_end = step % spe == 0                           # else: the end, mid-epoch (--max-steps)
            win, ep_loss = engine.flush(lr_fn, epoch_too=ep_end)
            if win is not None:
                log("log", win)
            if ep_end:
                log("epoch", ep_loss)
            if not ep_end or (step // spe) % args.save_every == 0 or step >= stop:
                save(by_epoch=ep_end)
            if lead and ep_end and ((step // spe) % args.grid_every == 0 or step >= stop):
                save_grid(model, grid_x, os.path.join(out, f"grid-{step // spe:04d}.png"), engine, args.seed)
    except Diverged as e:
        kept = f"{ckpt_path} (step {st['saved']}) is untouched" if st["saved"] is not None else "no checkpoint was written"
        raise Diverged(f"{e}; stopped without saving: {kept}. Lower --lr/--blr or set --clip-grad") from None
    finally:
        bar.close()
    if lead:
        grid = save_grid(model, grid_x, os.path.join(out, "grid.png"), engine, args.seed)
        res = {"final_loss": st["loss"], "steps": step, "seconds": round(time.time() - t_start, 2),
               "checkpoint": ckpt_path, "log": log_path, "grid": grid}
        print(f"[pretrain] done. {grid}: rows = clean, then noised / denoised at t = {', '.join(map(str, GRID_T))}")
        print(json.dumps(res), flush=True)
        return res


if __name__ == "__main__":
    data.run_cli(main, get_args_parser())
