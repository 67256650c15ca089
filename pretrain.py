"""Pre-train an l-DAE (RECIPE s3, s4, s6), or a DiT baseline row, on a CPU, one GPU, or many.

Quick start (CPU, synthetic shapes, ~1 min; writes out/tiny/: checkpoint.pt, log.jsonl, grid.png,
pca.pt):
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
  JPEGs on the GPU when the CPUs cannot keep up (see augment.py).
A paper row: python pretrain.py --preset t3_ldae ...   (dit_baseline.PRESETS; explicit flags win)
Speed:       python pretrain.py --model vit_b --benchmark 20 --batch-size 256 [--compile]

Determinism: data order, augmentation and noise are pure functions of (seed, epoch, index) and
(seed, step, micro-batch) (GlobalBatchSampler, Indexed, Engine.step), so a resume is exact and any
layout with the same world x accum (8 GPUs, or 1 GPU with --accum-iter 8) computes the same steps.
"""
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import augment
import checkpoint
import cli
import data
import distributed
import dit_baseline
import ldae
import trainer
from cli import UserError
from tokenizer_pca import PatchPCA, fit_pca

FAMILIES = {"ldae": ldae, "dit": dit_baseline}
ALL_MODELS = {**ldae.MODELS, **dit_baseline.MODELS}
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
               "L40S": 362.0}                                    # dense bf16, per GPU
GRID_T = (100, 300, 500, 700, 900)
# Training defaults of the CPU-sized models (32 px), measured to learn on the synthetic set and
# Fashion-MNIST (docs/RESULTS.md); every other model keeps the paper's (RECIPE s6). They sit
# under explicit flags and replace a --preset's ImageNet-sized batch, lr and length.
_SMALL = dict(batch_size=64, lr=4e-3, epochs=10, warmup_epochs=1, ema=0.999, pca_images=500,
              save_every=5, grid_every=5, log_every=10, input_size=None)   # None: the model's
SMALL_DEFAULTS = {name: _SMALL for name in ("vit_tiny", "vit_small", "dit_tiny_1", "dit_tiny_2")}
# The flags of the "model flags" group: the model config (stored in the checkpoint) holds them
MODEL_ARGS = ("latent_dim", "latent_scale", "latent_norm", "cond_ratio", "residual_weight",
              "noise", "single_sigma", "target", "patch_size", "grad_checkpoint", "schedule",
              "prediction", "class_cond", "dit_input", "latents_file")


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
    """-> a pretrain.py checkpoint dict, read with weights_only=True (UserError if not one)."""
    return checkpoint.load_checkpoint(path, required=("model", "model_config", "pca", "step"))


def model_from_checkpoint(ckpt, weights="ema", device="cpu"):
    """The checkpoint's exact model (its config + PCA basis) with its EMA or raw weights."""
    cfg = dict(ckpt["model_config"])
    fam, name = cfg.pop("family", "ldae"), cfg.pop("name", None)
    cfg.setdefault("latent_norm", "none")      # checkpoints from before --latent-norm
    if fam == "repfusion":
        raise UserError("this is a distill.py run's checkpoint (student, adaptor, policy); the "
                        "student alone is OUTPUT_DIR/student.pt")
    families = dict(FAMILIES)
    if fam == "resnet":                        # distill.py's ResNet students (distill imports us)
        import distill
        families["resnet"] = distill
    if fam not in families or name not in families[fam].MODELS:
        raise UserError(f"the checkpoint's model {fam!r} / {name!r} is not in this version's "
                        f"registry ({', '.join(sorted(ALL_MODELS))})")
    sd = ckpt.get("ema") if weights == "ema" else ckpt["model"]
    if sd is None:
        print("[ckpt] no EMA weights in this checkpoint (trained with --ema 0): using the raw "
              "weights")
        sd = ckpt["model"]
    pca = None
    if ckpt.get("pca") is not None:
        pca = PatchPCA.from_dict(ckpt["pca"])
    try:
        model = families[fam].build_model(name, pca, **cfg)
    except (ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"the checkpoint's model config cannot be built ({e}); was it written by "
                        f"another version of pretrain.py?") from None
    checkpoint.load_weights(model, sd)
    return model.to(device).eval()


# ---- Flags ------------------------------------------------------------------------------------
class PresetParser(cli.ArgumentParser):
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
    num = cli.bounded
    p = PresetParser(prog="pretrain.py", description="Pre-train an l-DAE or a DiT baseline row "
                     "(RECIPE.md s3, s4, s6). Defaults are the paper's ImageNet recipe; the 32 px "
                     "CPU models (vit_tiny, vit_small, dit_tiny_*) get pretrain.SMALL_DEFAULTS.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_b", help=f"one of {', '.join(sorted(ALL_MODELS))}")
    g.add_argument("--preset", default=None, help="a paper row, dit_baseline.PRESETS (sets "
                   "defaults; explicit flags win)")
    trainer.add_training_args(p)
    g = p.add_argument_group("PCA tokenizer (RECIPE s2)")
    g.add_argument("--pca", default=None,
                   help="a tokenizer_pca.py file; default: fit on the train set -> "
                   "OUTPUT_DIR/pca.pt")
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
    g = p.add_argument_group("benchmark")
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


# ---- Pictures, benchmark, settings ----------------------------------------------------------
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
    return cli.atomic_write(path, lambda tmp: torchvision.utils.save_image(
        grid, tmp, format="png", nrow=len(x), padding=2, pad_value=1.0))


def benchmark(args, rank, world, device):
    """--benchmark N: the real training step (same Engine) on random data: img/s, FLOPs, MFU,
    memory."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, None, **model_overrides(args)).to(device)
    cfg, micro_size = model.config, args.batch_size // (world * args.accum_iter)
    engine, cuda = trainer.Engine(model, args, rank, world, device), device.type == "cuda"
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
           "peak_mem_gb": None}
    if cuda:
        res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if rank == 0:
        mfu = res["mfu"] if peak else "n/a (give --peak-tflops)"
        print(f"[benchmark] {res['img_per_s']} img/s, {res['train_gflops_per_img']} GFLOPs/img, "
              f"{res['tflops_per_device']} TFLOP/s per device, MFU {mfu}")
        print(json.dumps(res), flush=True)
    return res


# ---- Training ---------------------------------------------------------------------------------
def print_settings(args, model, engine, world, n_images, steps_per_epoch, last, base_lr, start):
    """The effective settings in one block (as MAE prints them): what this run really does."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    latent = ""
    if "latent_dim" in cfg:
        latent = (f", latent d = {cfg['latent_dim']}, norm {cfg['latent_norm']}, "
                  f"scale {cfg['latent_scale']:g}")
    micro = args.batch_size // (world * args.accum_iter)
    lr_rule = f"--blr {args.blr:g} x batch / 256"
    if args.lr is not None:
        lr_rule = "--lr"
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    lines = [
        f"model       {cfg['name']} ({cfg['family']}): {params:.2f}M params, {cfg['img_size']} px, "
        f"patch {cfg['patch_size']}{latent}",
        f"data        {args.dataset}: {n_images} train images, aug {args.aug}",
        f"batch       global {args.batch_size} = {world} rank(s) x accum {args.accum_iter} x "
        f"micro-batch {micro}; {steps_per_epoch} steps per epoch",
        f"lr          peak {base_lr:.4g} ({lr_rule}), warmup {args.warmup_epochs:g} epochs "
        f"({warmup_steps} steps), cosine to {args.min_lr:g} over {args.epochs:g} epochs",
        *trainer.run_settings_lines(args, engine, start, last),
    ]
    print("[pretrain] effective settings\n  " + "\n  ".join(lines), flush=True)


def get_pca(args, cfg, rank, world, device, train_base):
    """--pca FILE, or a fit on a sample of the train set by rank 0 (the others wait, then load)."""
    path = args.pca or os.path.join(args.output_dir, "pca.pt")
    fix = "fit one with tokenizer_pca.py, or drop --pca to fit one here"
    if args.pca and not os.path.isfile(path):
        raise UserError(f"--pca file {path} does not exist; {fix}")
    if not args.pca and rank == 0:
        # RECIPE s2: fitted on DiT center crops (as tokenizer_pca.py does), even for rrc runs
        fit_ds = train_base
        if args.aug != "center":
            center = augment.build_transform("center", cfg["img_size"])
            fit_ds = data.build_dataset(args, "train", center, decode_gpu_ok=True)
        print(f"[pca] fitting on {args.pca_images} train images (RECIPE s2) -> {path}", flush=True)
        pca = fit_pca(augment.decoded(fit_ds), cfg["patch_size"], args.pca_images,
                      center=args.pca_center, seed=args.seed, device=device,
                      num_workers=args.num_workers, meta={"dataset": args.dataset})
        cli.save_torch(pca.to_dict(), path)
    if not args.pca and world > 1:
        dist.barrier()                             # one node, or an OUTPUT_DIR all nodes share
    pca = PatchPCA.from_dict(cli.load_torch(path, "--pca file", fix))
    if pca.patch_size != cfg["patch_size"] or pca.channels != cfg.get("in_chans", 3):
        raise UserError(f"the PCA {args.pca or ''} has {pca.patch_size}px x {pca.channels}ch "
                        f"patches "
                        f"but --model {args.model} uses {cfg['patch_size']}px x "
                        f"{cfg.get('in_chans', 3)}ch; refit it")
    if pca.img_size != cfg["img_size"] and rank == 0:   # the basis is per patch: any size works
        print(f"[pca] note: fitted on {pca.img_size}px images, training at {cfg['img_size']}px")
    return pca


def train(args, rank, world, device):
    is_main = rank == 0
    distributed.check_layout(args, world)
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls and convolutions on CUDA
    torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):                     # the config alone, nothing allocated
        cfg = build_model(args.model, None, **model_overrides(args)).config
    args.input_size = cfg["img_size"]
    if args.benchmark:
        return benchmark(args, rank, world, device)
    if cfg.get("input") == "latents" and args.decode == "gpu":
        raise UserError("--decode gpu decodes JPEG files, but this model reads --latents-file; "
                        "drop --decode gpu")
    source, ckpt = checkpoint.open_run(args, is_main, world, ignore=MODEL_ARGS)
    train_set = distributed.node_first(lambda: training_set(args, cfg), world)
    distributed.cap_batch(args, len(train_set), world, is_main)
    changed = []
    if ckpt is not None:
        changed = checkpoint.check_resume(ckpt, args, world, ignore=MODEL_ARGS)
    if cfg.get("input") == "latents":
        pca = None                                 # a DiT on the user's latents: no PCA
    elif ckpt is not None:
        pca = PatchPCA.from_dict(ckpt["pca"])      # the run's own basis, never refitted
    else:
        pca = get_pca(args, cfg, rank, world, device, train_set)
    torch.manual_seed(args.seed)                   # the same init on every rank
    overrides = model_overrides(args, num_classes=data.num_classes(train_set))
    model = build_model(args.model, pca, **overrides).to(device)
    engine = trainer.Engine(model, args, rank, world, device)
    start = checkpoint.restore(engine, ckpt, model.config)
    steps_per_epoch = len(train_set) // args.batch_size
    last = min(max(1, round(args.epochs * steps_per_epoch)), args.max_steps or math.inf)
    base_lr = trainer.scaled_lr(args, args.batch_size)                 # RECIPE s6

    def lr_fn(step):
        return trainer.lr_at(step, steps_per_epoch, base_lr, args.warmup_epochs, args.epochs,
                             args.min_lr)

    def describe():                                # the checkpoint rebuilds the model alone
        return {"model_config": model.config, "pca": model.pca.to_dict()}

    run = trainer.TrainingRun(args, engine, train_set, world, lr_fn, last, describe)
    grid_images = run.first_images()

    def picture(path):
        return save_grid(model, grid_images, path, engine, args.seed)

    run.picture = picture
    if is_main:
        print_settings(args, model, engine, world, len(train_set), steps_per_epoch, last, base_lr,
                       start)
        if ckpt is not None:
            print(f"[resume] {source} at step {start}; changed: {', '.join(changed) or 'nothing'} "
                  f"(the data order, schedule and model are the checkpoint's)", flush=True)
        warn_if_all_warmup(args, steps_per_epoch, last, lr_fn, base_lr)
    res = run.run(start, source, changed)
    if is_main:
        print(f"[pretrain] done. {res['grid']}: rows = clean, then noised / denoised at t = "
              f"{', '.join(map(str, GRID_T))}")
        print(json.dumps(res), flush=True)
    return res


def training_set(args, cfg):
    if cfg.get("input") == "latents":
        return dit_baseline.make_latent_dataset(args.latents_file)
    transform = augment.build_transform(args.aug, args.input_size)
    return data.build_dataset(args, "train", transform, decode_gpu_ok=True)


def warn_if_all_warmup(args, steps_per_epoch, last, lr_fn, base_lr):
    warmup_steps = args.warmup_epochs * steps_per_epoch
    if warmup_steps >= last:
        print(f"[pretrain] warning: the warmup ({warmup_steps:g} steps) is as long as the run "
              f"({last} steps): the lr never leaves warmup and peaks at {lr_fn(last - 1):.3g}, "
              f"not {base_lr:.3g}; shorten --warmup-epochs", flush=True)


def main(args):
    return distributed.run_distributed(train, args)


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
