"""Pre-train an l-DAE (RECIPE s3, s4, s6) or a DiT baseline row (RECIPE s7), CPU to many GPUs.

  python pretrain.py --model vit_tiny --output-dir out/tiny          # CPU quick start, ~1 min
  torchrun --nproc_per_node=8 pretrain.py --model vit_b --dataset imagefolder --data-path IMNET \\
      --batch-size 2048 --epochs 400 --warmup-epochs 100 --aug rrc --pca-images 10000 \\
      --output-dir out/vit_b                                      # the final ViT-B, RECIPE s6

OUTPUT_DIR gets checkpoint.pt, log.jsonl, grid.png and pca.pt; --resume auto continues a stopped
run bit-identically (SIGTERM or Ctrl-C: saved, exit 128 + signal). More: docs/USAGE.md.
"""
import copy
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import dit_baseline
from tokenizer_pca import fit_pca
from util import checkpoint, cli, datasets, decode, distributed, files, registry, transforms
from util.cli import UserError
from util.engine import Engine, train_one_epoch
from util.train_flags import add_training_args

GRID_T = (100, 300, 500, 700, 900)                 # the noise levels of the image grid
# The CPU-sized models' defaults, measured to learn on the synthetic set and on Fashion-MNIST
# (docs/RESULTS.md); blr 0.016 is lr 4e-3 at batch 64. Other models keep the paper's (RECIPE s6).
SMALL = dict(batch_size=64, blr=0.016, epochs=10, warmup_epochs=1, ema=0.999, pca_images=500,
             save_every=5, grid_every=5, log_every=10, input_size=None)
SMALL_DEFAULTS = {name: SMALL for name in ("vit_tiny", "vit_small", "dit_tiny_1", "dit_tiny_2")}


class PresetParser(cli.ArgumentParser):
    """Defaults in layers: --preset NAME, then a small model's SMALL_DEFAULTS (replacing the
    preset's ImageNet-sized batch, lr and length), then the explicit flags, which always win."""

    def parse_known_args(self, args=None, namespace=None):
        own = {a.dest: a.default for a in self._actions}   # restored: a reused parser starts clean
        try:
            ns, rest = super().parse_known_args(args, copy.copy(namespace))
            preset = getattr(ns, "preset", None)
            if preset and preset not in dit_baseline.PRESETS:
                self.error(f"unknown --preset {preset!r}; choose from "
                           f"{', '.join(sorted(dit_baseline.PRESETS))}")
            if preset:
                self.set_defaults(**dit_baseline.PRESETS[preset])
                ns, rest = super().parse_known_args(args, copy.copy(namespace))
            small = SMALL_DEFAULTS.get(getattr(ns, "model", None))
            if preset or small:
                self.set_defaults(**(small or {}))
                ns, rest = super().parse_known_args(args, namespace)
            return ns, rest
        finally:
            self.set_defaults(**own)


def get_args_parser():
    num = cli.bounded
    p = PresetParser(prog="pretrain.py", description="Pre-train an l-DAE or a DiT baseline row "
                     "(RECIPE.md s3-s7). Defaults are the paper's ImageNet recipe; the 32 px CPU "
                     "models (vit_tiny, vit_small, dit_tiny_*) get pretrain.SMALL_DEFAULTS.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_b", help=f"one of {', '.join(registry.PRETRAIN_MODELS)}")
    g.add_argument("--preset",
                   help="a paper row, dit_baseline.PRESETS (sets defaults; explicit flags win)")
    add_training_args(p)
    g = p.add_argument_group("PCA tokenizer (RECIPE s2)")
    g.add_argument("--pca", help="a tokenizer_pca.py file; default: fit on the "
                   "train set -> OUTPUT_DIR/pca.pt")
    g.add_argument("--pca-images", type=num(int, 1), default=1000,
                   help="train images for that fit (ImageNet: 10000+)")
    g.add_argument("--pca-center", action="store_true", help="subtract the mean patch in that fit")
    g = p.add_argument_group("model flags (default: the registry's value; ldae.py / "
                             "dit_baseline.py MODEL_FLAGS)")
    g.add_argument("--latent-dim", type=num(int, 0),
                   help="d: PCA coordinates the noise goes into (DiT: 0 = all D, the pixel row)")
    g.add_argument("--latent-norm", choices=["none", "global", "whiten"],
                   help="latent normalisation before the noise (RECIPE s2)")
    g.add_argument("--latent-scale", type=num(float, 0, low_open=True),
                   help="z = scale x gain x V_d x")
    g.add_argument("--cond-ratio", type=num(float, 0, low_open=True),
                   help="conditioning width / model width (paper rows 0.25, official DiT 1)")
    g.add_argument("--patch-size", type=num(int, 1), help="image patch side p")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in the backward pass (memory)")
    g.add_argument("--residual-weight", type=num(float, 0),
                   help="l-DAE: loss weight of the coordinates beyond d (paper 0.1)")
    g.add_argument("--noise", choices=["multi", "single"], help="l-DAE: noise levels")
    g.add_argument("--single-sigma", type=num(float, 0, low_open=True),
                   help="l-DAE: the one level of --noise single (sqrt(1/3))")
    g.add_argument("--target", choices=["original", "projected", "latent"],
                   help="l-DAE: what the network predicts (Table 3's last rows)")
    g.add_argument("--schedule", choices=list(dit_baseline.SCHEDULES), help="DiT: noise schedule")
    g.add_argument("--prediction", choices=list(dit_baseline.PREDICTIONS),
                   help="DiT: eps or x0 prediction")
    g.add_argument("--class-cond", choices=["true", "false"],
                   help="DiT: class-conditional (Table 1 row 1)")
    g.add_argument("--dit-input", choices=["pca", "latents"],
                   help="DiT: the PCA latent of the images, or --latents-file")
    g.add_argument("--latents-file",
                   help="DiT: {'latents': (N, C, h, w), 'labels': (N,)} from your tokenizer")
    datasets.add_data_args(p)
    p.set_defaults(input_size=None)            # None: the model's img_size (vit_tiny 32, vit_b 256)
    return p


def model_overrides(args, **extra):
    """The model flags of args (the registry keeps the family's); --input-size is img_size."""
    given = {k: getattr(args, k) for k in registry.MODEL_ARGS if hasattr(args, k)}
    return {**given, "img_size": args.input_size, **extra}


def main(args):
    return distributed.run_distributed(train, args)


def train(args, rank, world, device):
    """Arguments -> data -> PCA -> model -> the epoch loop -> checkpoints and image grids."""
    is_main = rank == 0
    distributed.check_layout(args, world)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # TF32 on CUDA
    with torch.device("meta"):                     # the config alone, nothing allocated
        shape = registry.build_model(args.model, None, **model_overrides(args))
    cfg = shape.config
    args.input_size = cfg["img_size"]
    latents = cfg.get("input") == "latents"        # a DiT on a tokenizer's latents: no images
    # the defaults this model and preset give
    layers = ["--model", args.model] + (["--preset", args.preset] if args.preset else [])
    cli.refuse_ignored(args, get_args_parser().parse_args(layers), [
        (bool(args.pca), ["pca_images", "pca_center"], "with --pca FILE (its basis is read)"),
        (latents, ["pca", "pca_images", "pca_center", "decode"],
         "on --latents-file (no PCA, no images to decode)")])
    source, ckpt, train_set, changed, data = checkpoint.open_run(
        args, is_main, world, registry.MODEL_ARGS, lambda: training_set(args, latents),
        inputs=[args.pca])
    # a step's memory floor: weights, EMA, AdamW's 2 moments, and the block inputs backward keeps
    numbers = sum(t.numel() for t in shape.state_dict().values() if isinstance(t, torch.Tensor))
    kept = args.batch_size // (world * args.accum_iter) * shape.pos_embed.numel() * cfg["depth"]
    cli.check_memory(4 * (4 * numbers + kept), f"--model {args.model} at {cfg['img_size']} px, "
                     f"batch {args.batch_size}", "pass a smaller --input-size, batch or model",
                     device)
    pca = None                                     # latents: no PCA
    if ckpt is not None:
        pca = registry.load_pca(ckpt["pca"], source)   # a resumed run keeps its own basis
    elif not latents:
        pca = get_pca(args, cfg, rank, world, device, train_set)

    torch.manual_seed(args.seed)                   # the same init on every rank
    overrides = model_overrides(args, num_classes=datasets.num_classes(train_set))
    model = registry.build_model(args.model, pca, **overrides).to(device)
    engine = Engine(model, args, rank, world, device)
    start = checkpoint.restore(engine, ckpt, model.config)
    run = checkpoint.Run(args, engine, len(train_set),
                         lambda: {"model_config": model.config, "pca": model.pca.to_dict()},
                         start, source, changed, data)
    loader = distributed.make_loader(train_set, args, world, rank, device)
    grid_images = distributed.first_images(loader, 8, device)
    if is_main:
        print_settings(args, model, run, len(train_set), changed if ckpt else None)

    with distributed.StopSignal(world) as stop, run:
        for epoch in range(run.first_epoch, run.epochs):
            signum = train_one_epoch(engine, loader, epoch, run, stop)
            run.end_epoch(signum)                  # the log and the checkpoint
            if is_main and run.due(args.grid_every):
                save_grid(model, grid_images, engine, args, f"grid-{epoch + 1:04d}.png")
            if signum:
                run.stop(signum)
    if not is_main:
        return None
    res = run.result()
    res["grid"] = save_grid(model, grid_images, engine, args, "grid.png")
    print(f"[pretrain] done. {res['grid']}: rows = clean, then noised / denoised at t = "
          f"{', '.join(map(str, GRID_T))}")
    print(json.dumps(res), flush=True)
    return res


def training_set(args, latents):
    if latents:
        return datasets.open_latents(args.latents_file)
    transform = transforms.build_transform(args.aug, args.input_size)
    return datasets.build_dataset(args, "train", transform, decode_gpu_ok=True)


def get_pca(args, cfg, rank, world, device, train_set):
    """--pca FILE, or a fit on a sample of the train set by rank 0 (the others wait, then load)."""
    path = args.pca or os.path.join(args.output_dir, "pca.pt")
    fix = "fit one with tokenizer_pca.py, or drop --pca to fit one here"
    if args.pca and not os.path.isfile(path):
        raise UserError(f"--pca file {path} does not exist; {fix}")
    if not args.pca and rank == 0:
        # RECIPE s2: fitted on center crops (as tokenizer_pca.py does), even for rrc runs
        fit_set = train_set
        if args.aug != "center":
            center = transforms.build_transform("center", cfg["img_size"])
            fit_set = datasets.build_dataset(args, "train", center, decode_gpu_ok=True)
        print(f"[pca] fitting on {args.pca_images} train images (RECIPE s2) -> {path}", flush=True)
        pca = fit_pca(decode.decoded(fit_set), cfg["patch_size"], args.pca_images,
                      center=args.pca_center, seed=args.seed, device=device,
                      num_workers=args.num_workers, meta={"dataset": args.dataset})
        files.save_torch(pca.to_dict(), path)
    if not args.pca and world > 1:
        dist.barrier()                             # one node, or an OUTPUT_DIR all nodes share
    pca = registry.load_pca(files.load_torch(path, "--pca file", fix), f"--pca {path}")
    channels = cfg.get("in_chans", 3)
    if pca.patch_size != cfg["patch_size"] or pca.channels != channels:
        raise UserError(f"the PCA {path} has {pca.patch_size}px x {pca.channels}ch patches but "
                        f"--model {args.model} uses {cfg['patch_size']}px x {channels}ch; refit it")
    if pca.img_size != cfg["img_size"] and rank == 0:   # the basis is per patch: any size works
        print(f"[pca] note: fitted on {pca.img_size}px images, training at {cfg['img_size']}px")
    return pca


def print_settings(args, model, run, n_images, changed):
    cfg = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    latent = ""
    if "latent_dim" in cfg:
        latent = (f", latent d = {cfg['latent_dim']}, norm {cfg['latent_norm']}, "
                  f"scale {cfg['latent_scale']:g}")
    lr_rule = "--lr" if args.lr is not None else f"--blr {args.blr:g} x batch / 256"
    warmup_steps = args.warmup_epochs * run.steps_per_epoch
    lines = [
        f"model       {cfg['name']} ({cfg['family']}): {params:.2f}M params, {cfg['img_size']} px, "
        f"patch {cfg['patch_size']}{latent}",
        f"data        {args.dataset}: {n_images} train images, aug {args.aug}",
        f"lr          peak {run.base_lr:.4g} ({lr_rule}), warmup {args.warmup_epochs:g} epochs "
        f"({round(warmup_steps)} steps), cosine to {args.min_lr:g} over {args.epochs:g} epochs"]
    if warmup_steps >= run.last:
        lines.append(f"            warning: the warmup ({warmup_steps:g} steps) is as long as the "
                     f"run ({run.last} steps): the lr peaks at {run.lr_fn(run.last - 1):.3g}, "
                     f"not {run.base_lr:.3g}; shorten --warmup-epochs")
    lines += run.settings_lines()
    if changed is not None:
        lines.append(f"resume      {run.source} at step {run.step}; changed: "
                     f"{', '.join(changed) or 'nothing'}")
    cli.print_settings("pretrain", lines)


@torch.no_grad()
def save_grid(model, x, engine, args, name):
    """OUTPUT_DIR/name: clean images, then for each t in GRID_T a noised and a denoised row."""
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), engine.autocast():
        torch.manual_seed(args.seed)               # the same noise every time: grids compare
        rows = [x[:, :3]] + [r for t in GRID_T for r in model.denoise(x, t)]   # DiT: false colour
    model.train()
    grid = torch.cat([r.float() for r in rows]).clamp(-1, 1) * 0.5 + 0.5
    if grid.shape[-1] < 96:                        # small images: a nearest upscale, readable
        grid = nn.functional.interpolate(grid, scale_factor=96 // grid.shape[-1], mode="nearest")
    path = os.path.join(args.output_dir, name)
    return files.atomic_write(path, lambda tmp: torchvision.utils.save_image(
        grid, tmp, format="png", nrow=len(x), padding=2, pad_value=1.0))


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
