"""The frozen encoder linprobe.py reads: the model, the settings to probe, one feature pass."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import dit_baseline
from util import cli, distributed, registry
from util.cli import UserError


def load_backbone(args, device):
    """The checkpoint's model, frozen; --random-init keeps the PCA basis (fitted, not learned)."""
    ckpt = registry.load(args.ckpt)
    model = registry.model_from_checkpoint(ckpt, args.weights, "cpu")
    args.weights_used = args.weights if ckpt.get("ema") is not None else "raw"    # for the report
    preset = ckpt.get("args", {}).get("preset")
    if preset in dit_baseline.TABLE4_PRESETS and not args.select_setting:
        print(f"[probe] note: the paper probes {preset} (Table 4) at the best (t, clean or noisy "
              f"input), linprobe.py --select-setting; this run uses one fixed setting", flush=True)
    if args.random_init:
        torch.manual_seed(args.seed)
        model.init_weights(active=True)
        print(f"[probe] --random-init: freshly initialised {model.config.get('name')} with "
              f"ACTIVE blocks (init_weights(active=True): adaLN gates open); checkpoint weights "
              f"unused", flush=True)
    return model.to(device).eval().requires_grad_(False)


def make_featurizer(model, keys, args):
    """-> f(images) -> {(depth, t, noisy): (B, D) float32}: one forward pass per (t, noisy)."""
    if model is None:
        def pixels(x):
            if x.shape[-1] > 32:
                x = F.adaptive_avg_pool2d(x, 32)
            return {keys[0]: x.flatten(1).float()}
        return pixels
    depths = sorted({key[0] for key in keys})
    levels = sorted({key[1:] for key in keys})      # (t, noisy) pairs
    forward = torch.compile(model.forward_features) if args.compile else model.forward_features
    extra = {"clean": "image"} if args.clean_input == "image" else {}    # not V_d^T V_d x

    def features(x):
        out = {}
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):    # bf16: the fast path
            for t, noisy in levels:
                for depth, f in zip(depths, forward(x, t=t, depth=depths, noisy=noisy, **extra)):
                    out[(depth, t, noisy)] = f.float()
        return {key: out[key] for key in keys}
    return features


def extract(featurize, ds, args, device, rank, world, desc):
    """One pass -> ({key: (N, D)}, labels (N,)) on CPU; rank r of W takes items r, r+W, ..."""
    loader = DataLoader(Subset(ds, range(rank, len(ds), world)), batch_size=args.max_device_batch,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=distributed.ignore_stop_signals)   # Ctrl-C: one line
    chunks, labels = {}, []
    with torch.inference_mode():                # no autograd state at all; faster than no_grad
        for x, y in cli.progress(iterable=loader, desc=desc, disable=rank != 0, leave=False):
            for key, f in featurize(x.to(device, non_blocking=True)).items():
                chunks.setdefault(key, []).append(f.cpu())
            labels.append(y)
    shard = -(-len(ds) // world)                # the longest shard: all_gather needs equal sizes

    def gather(t):                              # (n_r, ...) -> (N, ...) in dataset order
        if world == 1:
            return t
        padded = torch.zeros((shard, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[:len(t)] = t.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.stack(parts, 1).reshape(shard * world, *t.shape[1:])[:len(ds)].cpu()
    return {key: gather(torch.cat(v)) for key, v in chunks.items()}, gather(torch.cat(labels))


def cached_features(featurize, centre_ds, crops_ds, val_ds, args, device, rank, world):
    """-> {key: (V, N, D)}, train labels (N,), {key: (M, D)}, val labels (M,), all on the CPU."""
    per_view = []
    for view in range(args.views):              # view 0: center crop (as val); then random crops
        torch.manual_seed(args.seed + view)     # worker seeds derive from it: reproducible crops
        ds = centre_ds if view == 0 else crops_ds
        per_view.append(extract(featurize, ds, args, device, rank, world, f"train view {view}"))
    val_x, val_y = extract(featurize, val_ds, args, device, rank, world, "val")
    train_x = {key: torch.stack([f[key] for f, _ in per_view]) for key in per_view[0][0]}
    return train_x, per_view[0][1], val_x, val_y


def probe_keys(args, cfg, pixels, model):
    """-> (input size, the (depth, t, noisy) settings: one, --grid's or Table 4's)."""
    size = cfg.get("img_size")
    if args.input_size is None:
        args.input_size = size or 32
    elif size and args.input_size != size:
        raise UserError(f"the checkpoint's model takes {size}x{size} images (fixed position "
                        f"embedding), not --input-size {args.input_size}; drop --input-size or "
                        f"pass {size}")
    if pixels:
        return args.input_size, [(None, None, False)]
    blocks = cfg.get("depth", 0)
    depths = [args.probe_depth or blocks // 2]
    if args.grid:                               # default: depths around the encoder's end (s5)
        default = list(range(max(1, blocks // 4), 3 * blocks // 4 + 1, max(1, blocks // 8)))
        depths = args.grid_depths or default
    ts = args.grid_ts
    if not (args.grid or args.select_setting):
        ts = [model.probe_t if args.probe_t is None else args.probe_t]
    inputs = args.grid_inputs or ("both" if args.select_setting else None)
    inputs = inputs or ("noisy" if args.noisy_input else "clean")
    noisy = {"clean": [False], "noisy": [True], "both": [False, True]}[inputs]
    steps = cfg.get("num_steps", 1000)
    if not all(0 <= t < steps for t in ts):
        raise UserError(f"probe levels t must be in 0..{steps - 1} (the model's noise steps), "
                        f"got {sorted(ts)}")
    if not all(1 <= depth <= blocks for depth in depths):
        raise UserError(f"probe depths must be in 1..{blocks} (the blocks of {cfg.get('name')}), "
                        f"got {depths}")
    return args.input_size, [(depth, t, n) for depth in depths for t in ts for n in noisy]
