"""Linear probe of a frozen l-DAE (or DiT-baseline) encoder: the number every table of the paper
reports (RECIPE s5). Only a BatchNorm1d(affine=False) + Linear head trains; the backbone never does.

--protocol mae     the paper's ("follows MAE"): each epoch the encoder sees fresh RandomResizedCrop +
    flip views; LARS, wd 0, batch 16384, lr = blr * batch / 256 with blr 0.1 (6.4), 90 epochs,
    10 warmup, per-iteration cosine; resize + center-crop test. The paper's text says 6.4e-3: under
    LARS (trust 0.001) lr 6.4 moves a weight matrix by ~6.4e-3 of its norm per step, so both
    figures describe the same step; --lr 6.4e-3 here would be a step 1000x smaller.
--protocol cached  ONE encoder pass over train (center crop; --views K adds K-1 random crops) and
    val, then a probe optimisation cannot bias: TRAIN-normalised features, the head solved
    to convergence (--solver lbfgs, default) or given mae's LARS schedule (--solver lars), its one
    free setting (L2 or lr) chosen on a held-out 10% of TRAIN, never on val.
--grid             (cached) one pass per t gives several depths; a head per (depth, t): DDAE's grid.
Baselines for every table: --random-init (same config, fresh weights, ACTIVE blocks: with DiT's zero
adaLN gates each block is the identity) and --baseline pixels (raw pixels, <= 32x32x3, same probe).

  python linprobe.py out/tiny/checkpoint.pt --protocol cached [--random-init | --baseline pixels]
  python linprobe.py out/tiny/checkpoint.pt --grid --grid-depths 1,2,3 --grid-ts 0,10,100
  torchrun --nproc_per_node=8 linprobe.py out/vit_b/checkpoint.pt --dataset imagefolder \
      --data-path /data/imagenet --protocol mae                      # the paper's ImageNet probe
Input size, depth and model come from the checkpoint. Writes --output-dir/log.jsonl (a JSON line
per epoch or solve) and head.pt (heads, feature normalisation, settings; no backbone). The last
line printed is one JSON object (top1, top5, protocol, probe settings). Features stay in memory.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import dit_baseline
import pretrain                                   # contract: checkpoints, DDP setup, lr schedule
from data import UserError


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's linear probe uses it, written from its definition. Per step,
    for each parameter p with gradient g:
        ndim > 1 (weights):  u = g + wd p;  u <- u * eta ||p|| / ||u||  (when both norms > 0)
        1-D (biases, BN):    u = g          (no decay, no trust ratio)
        m <- momentum m + u;  p <- p - lr m
    A weight matrix moves by a fixed fraction (~lr * eta) of its norm per step: stable at batch
    16384 and lr 6.4, but slow when there are few steps (small data sets; see probe_cached)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if p.ndim > 1:
                    u = u.add(p, alpha=group["weight_decay"])
                    pn, un = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    u = u * torch.where((pn > 0) & (un > 0), group["trust_coefficient"] * pn / un, 1.0)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(u)
                p.add_(mu, alpha=-group["lr"])


def make_head(dim, num_classes):
    """RECIPE s5 / MAE: BN without affine (a parameter-free standardiser), Linear init std 0.01."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def lr_at(epoch, base_lr, warmup, epochs):   # MAE's, set every iteration (fractional epoch): pretrain's
    return pretrain.lr_at(epoch, 1, base_lr, warmup, epochs)      # warmup + half-cycle cosine to 0


def checksum(model):                # (n, 2) float64 sum and sum of squares of every float tensor
    return torch.tensor([[t.double().sum(), t.double().square().sum()] for t in model.state_dict().values()
                         if isinstance(t, torch.Tensor) and t.is_floating_point()], dtype=torch.float64)


def load_backbone(args, device):
    """Rebuild the model from the checkpoint's config, load strictly (pretrain's contract: a
    missing/foreign file or missing/unexpected keys are UserErrors naming the problem)."""
    ckpt = pretrain.load_checkpoint(args.ckpt)
    model = pretrain.model_from_checkpoint(ckpt, args.weights, "cpu")
    args.weights_used = args.weights if ckpt.get("ema") is not None else "raw"   # for the report
    preset = ckpt.get("args", {}).get("preset")
    if preset in dit_baseline.TABLE4_PRESETS and not args.select_setting:
        print(f"[probe] note: the paper probes {preset} (Table 4) at "
              f"{dit_baseline.PAPER_PROBE[preset]}; this run uses one fixed setting", flush=True)
    if args.random_init:
        # Issue 6's baseline: same network, fresh weights, every block live. The checkpoint gives
        # only the config and the PCA tokenizer (fitted, not learned by gradient: RECIPE s2).
        torch.manual_seed(args.seed)
        model.init_weights(active=True)
        print(f"[probe] --random-init: freshly initialised {model.config.get('name')} with ACTIVE "
              f"blocks (init_weights(active=True): adaLN gates open); checkpoint weights unused", flush=True)
    return model.to(device).eval().requires_grad_(False)


def make_featurizer(model, keys, args):
    """-> f(images (B, 3, S, S)) -> {(depth, t, noisy): (B, D) float32}. One forward_features pass
    per (t, clean or noisy input) returns every requested depth (RECIPE s5 probe depth/t/input
    ablations, DDAE grid)."""
    if model is None:                           # --baseline pixels: <= 32x32x3 = 3072 dims, area-averaged
        return lambda x: {keys[0]: (F.adaptive_avg_pool2d(x, 32) if x.shape[-1] > 32 else x).flatten(1).float()}
    depths = sorted({k[0] for k in keys})
    levels = sorted({k[1:] for k in keys})      # (t, noisy) pairs
    fwd = torch.compile(model.forward_features) if args.compile else model.forward_features

    def feats(x):
        out = {}
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):    # bf16: the fast path
            for t, noisy in levels:
                for d, f in zip(depths, fwd(x, t=t, depth=depths, noisy=noisy)):
                    out[(d, t, noisy)] = f.float()
        return {k: out[k] for k in keys}
    return feats


def extract(featurize, ds, args, device, rank, world, desc):
    """One encoder pass -> ({key: (N, D)} on CPU, labels (N,)). Under torchrun rank r takes items
    r, r+W, ...; the shards are gathered and interleaved back into dataset order."""
    loader = DataLoader(Subset(ds, range(rank, len(ds), world)), batch_size=args.max_device_batch,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    chunks, ys = {}, []
    with torch.inference_mode():                # no autograd state at all; faster than no_grad
        for x, y in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
            for k, f in featurize(x.to(device, non_blocking=True)).items():
                chunks.setdefault(k, []).append(f.cpu())
            ys.append(y)
    m = -(-len(ds) // world)

    def gather(t):                              # (n_r, ...) -> (N, ...) in dataset order
        if world == 1:
            return t
        pad = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=device)
        pad[:len(t)] = t.to(device)
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad)
        return torch.stack(parts, 1).reshape(m * world, *t.shape[1:])[:len(ds)].cpu()
    return {k: gather(torch.cat(v)) for k, v in chunks.items()}, gather(torch.cat(ys))


def train_head(head, batches, n, accum, base_lr, args, log, tag, net=None):
    """The probe schedule both protocols share (RECIPE s5 / MAE): LARS, wd 0, lr set every
    optimizer step (linear warmup, half-cycle cosine). batches(epoch) yields n micro-batches
    (features (b, D), labels (b,)); `accum` of them make one step of the global batch."""
    net, opt = net or head, LARS(head.parameters(), lr=base_lr)
    for ep in range(args.epochs):
        head.train()
        total, t0 = 0.0, time.time()
        for i, (f, y) in enumerate(batches(ep)):
            if i % accum == 0:
                opt.param_groups[0]["lr"] = lr_at(ep + i / n, base_lr, args.warmup_epochs, args.epochs)
            loss = F.cross_entropy(net(f), y)
            # the mean over the micro-batches this step really has (a small set's only step may
            # have fewer than accum); under DDP every micro-batch all-reduces: a tiny head
            in_step = min(accum, n - i // accum * accum)
            (loss / in_step).backward()
            if (i + 1) % accum == 0 or i + 1 == n:
                opt.step()
                opt.zero_grad(set_to_none=True)
            total = total + loss.detach()      # summed on the device: one host sync per epoch
        log({**tag, "epoch": ep + 1, "lr": opt.param_groups[0]["lr"], "train_loss": float(total) / max(n, 1),
             "seconds": round(time.time() - t0, 2)})
    return head


def fit_head(Xtr, ytr, Xev, yev, lr, args, C, device, seed, log=None, tag=None):
    """The mae schedule on cached features (drop_last like MAE) -> (head, top1 %, top5 %) on
    Xev (M, D). Xtr (V, N, D): each epoch draws one of the V views of every image."""
    V, N, D = Xtr.shape
    torch.manual_seed(seed)
    head, g = make_head(D, C).to(device), torch.Generator().manual_seed(seed)
    bs = min(args.batch_size, N)
    Xtr, ytr = Xtr.to(device), ytr.to(device)

    def batches(ep):
        perm, view = torch.randperm(N, generator=g).to(device), torch.randint(V, (N,), generator=g).to(device)
        for i in range(N // bs):
            idx = perm[i * bs:(i + 1) * bs]
            yield Xtr[view[idx], idx], ytr[idx]                         # (bs, D), (bs,)
    train_head(head, batches, N // bs, 1, lr, args, log or (lambda rec: None), tag or {})
    return head, *evaluate(head, Xev, yev, device)


@torch.no_grad()
def evaluate(head, X, y, device, chunk=65536):                          # X (M, D) -> [top1 %, top5 %]
    head.eval()
    hits = torch.zeros(2)
    for i in range(0, len(X), chunk):
        logits = head(X[i:i + chunk].to(device))                        # (b, C)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[i:i + chunk, None].to(device)
        hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).cpu()  # top-1, top-5 hits
    return (100.0 * hits / max(1, len(X))).tolist()


def fit_lbfgs(Xtr, ytr, Xev, yev, wd, args, C, device, seed, log=None, tag=None):
    """The same head solved to convergence: multinomial logistic regression, full-batch
    L-BFGS (strong-Wolfe line search), L2 wd/2 ||W||^2. Convex: the optimum depends on neither init,
    lr nor schedule, only on wd. BN keeps running stats (0, 1): identity on whitened inputs."""
    V, N, D = Xtr.shape
    X, y = Xtr.reshape(V * N, D).to(device), ytr.repeat(V).to(device)  # view-major rows
    torch.manual_seed(seed)
    head = make_head(D, C).to(device).eval()
    lin = head[1]
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=args.max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(lin(X), y) + 0.5 * wd * lin.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)                           # runs up to --max-iter iterations
    if log:
        log({**(tag or {}), "wd": wd, "train_loss": float(closure().detach()),
             "iterations": opt.state[lin.weight]["n_iter"]})
    return head, *evaluate(head, Xev, yev, device)


def feature_map(X, whiten, chunk=65536):
    """TRAIN statistics -> mean (D,), map P (D, r): (x - mean) @ P is standardised (what BN
    converges to) or PCA-whitened. Whitening is invertible on the data's span, so the probe's
    function class is unchanged, only its conditioning: network features have effective rank ~1.1
    and standardised L-BFGS took > 2000 iterations where whitened took ~300 (measured).
    Zero-variance directions (grayscale's repeated channels) are dropped. Float64 sums, chunked."""
    n, D = X.shape
    mu = sum(X[i:i + chunk].double().sum(0) for i in range(0, n, chunk)) / n                     # (D,)
    cov = sum((c := X[i:i + chunk].double() - mu).T @ c for i in range(0, n, chunk)) / n          # (D, D)
    if not whiten:
        sd = cov.diagonal().clamp_min(0).sqrt()
        return mu.float(), torch.diag(torch.where(sd > 1e-6, 1 / sd, torch.ones_like(sd))).float()
    ev, U = torch.linalg.eigh(cov)
    keep = ev > 1e-8 * ev.max()
    return mu.float(), (U[:, keep] / ev[keep].sqrt()).float()


def probe_cached(Xtr, ytr, Xva, yva, base_lr, args, C, device, log, tag):
    """Issue 6: optimisation must not decide the ranking. (1) Normalise with TRAIN statistics
    (whitened for lbfgs; standardised for lars, which mimics `mae`). (2) Choose the one free setting
    (lbfgs: L2 from --wd-grid; lars: lr from --lr-grid x base lr) by top-1 on a seeded held-out part
    of TRAIN (all views of a held-out image held out), retrain on all of train, score val once: val
    labels reach nothing else (--spread only reports)."""
    V, N, D = Xtr.shape
    lbfgs = args.solver == "lbfgs"
    mu, P = feature_map(Xtr.reshape(V * N, D), whiten=lbfgs)            # (D,), (D, r)
    Xtr, Xva = (Xtr - mu) @ P, (Xva - mu) @ P
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed))
    hold, fit = perm[:max(1, round(N * args.holdout))], perm[max(1, round(N * args.holdout)):]
    fit_fn, name = (fit_lbfgs, "wd") if lbfgs else (fit_head, "lr")
    grid = args.wd_grid if lbfgs else [base_lr * f for f in args.lr_grid]
    held = {v: fit_fn(Xtr[:, fit], ytr[fit], Xtr[0, hold], ytr[hold], v, args, C, device, args.seed)[1]
            for v in tqdm(grid, desc=f"{name} sweep {tag}", leave=False)}   # view 0 = center crop
    best = max(grid, key=held.get)                                     # ties: the first (smaller)
    head, top1, top5 = fit_fn(Xtr, ytr, Xva, yva, best, args, C, device, args.seed, log, tag)
    info = {"solver": "L-BFGS to convergence" if lbfgs else "LARS, probe schedule", name: best,
            "selection": f"best top-1 on a held-out {args.holdout:.0%} of train (seed {args.seed}) over "
                         f"{name} {grid}, then retrained on all of train",
            "features_normalised": "whitened" if lbfgs else "standardised", "heldout_top1": round(held[best], 2),
            f"heldout_top1_by_{name}": {f"{k:g}": round(v, 2) for k, v in held.items()}}
    if args.spread:                             # measurement only, never used to choose
        info[f"val_top1_by_{name}"] = {f"{v:g}": round(fit_fn(Xtr, ytr, Xva, yva, v, args, C, device,
                                                               args.seed)[1], 2) for v in grid}
    state = {"head": {k: v.cpu() for k, v in head.state_dict().items()}, "feature_mean": mu, "feature_map": P}
    return state, top1, top5, info


def cached_features(featurize, keys, train_sets, val_ds, args, device, rank, world):
    """-> {key: (V, N, D)}, ytr (N,), {key: (M, D)}, yva (M,), all in memory (CPU)."""
    per_view = []
    for v in range(args.views):                 # view 0: center crop (as val); 1..K-1: random crops
        torch.manual_seed(args.seed + v)        # worker seeds derive from it: reproducible crops
        per_view.append(extract(featurize, train_sets[min(v, 1)], args, device, rank, world, f"train view {v}"))
    va, yva = extract(featurize, val_ds, args, device, rank, world, "val")
    return {k: torch.stack([f[k] for f, _ in per_view]) for k in keys}, per_view[0][1], va, yva


def probe_mae(featurize, key, train_ds, val_ds, base_lr, args, C, device, rank, world, log):
    """The paper's protocol (RECIPE s5 = MAE's linear probe): the frozen encoder sees a fresh
    RandomResizedCrop + flip of every image each epoch. Global batch --batch-size, split over
    ranks and, when it does not fit (--max-device-batch), over accumulated micro-batches."""
    per_rank = args.batch_size // world
    accum = args.accum_iter or -(-per_rank // args.max_device_batch)   # micro-batches per step
    bs = max(1, per_rank // accum)
    sampler = torch.utils.data.DistributedSampler(train_ds, world, rank, seed=args.seed) if world > 1 else None
    loader = DataLoader(train_ds, bs, shuffle=sampler is None, sampler=sampler, num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed), pin_memory=device.type == "cuda",
                        drop_last=len(train_ds) // world >= per_rank)   # MAE drops the last batch,
    # but a set smaller than one global batch keeps all its images (one partial step per epoch)
    with torch.inference_mode():
        D = featurize(val_ds[0][0][None].to(device))[key].shape[1]
    torch.manual_seed(args.seed)
    head = make_head(D, C).to(device)

    def batches(ep):
        if sampler is not None:
            sampler.set_epoch(ep)
        for x, y in tqdm(loader, desc=f"epoch {ep + 1}", disable=rank != 0, leave=False):
            with torch.inference_mode():        # frozen backbone: eval mode, no graph
                f = featurize(x.to(device, non_blocking=True))[key]     # (b, D)
            yield f.clone(), y.to(device)       # clone: a normal tensor the head's autograd may save
    train_head(head, batches, len(loader), accum, base_lr, args, lambda rec: log(rec, echo=True), {},
               nn.parallel.DistributedDataParallel(head) if world > 1 else None)
    va, yva = extract(featurize, val_ds, args, device, rank, world, "val")
    top1, top5 = evaluate(head, va[key], yva, device)
    info = {"solver": "LARS, probe schedule", "lr": base_lr, "selection": "fixed (MAE: --blr * batch / 256, or --lr)",
            "features_normalised": "BN only", "accum_iter": min(accum, len(loader)),
            "device_batch": bs}
    return {"head": {k: v.cpu() for k, v in head.state_dict().items()}}, top1, top5, info


def probe_keys(args, depths, model):
    """The (depth, t, noisy) settings to probe. One setting by default: the last encoder block,
    --probe-t (default: the model's probe_t, 10, or a single-level model's own level) and a clean
    input (--noisy-input: noisy). --grid: every --grid-depths x --grid-ts. --select-setting: the
    paper's Table 4 "optimal setting", every --grid-ts with clean and with noisy input at the
    probe depth. --grid-inputs overrides which inputs. The best is chosen on held-out train."""
    select = args.grid or args.select_setting
    ts = args.grid_ts if select else [model.probe_t if args.probe_t is None else args.probe_t]
    inputs = args.grid_inputs
    if inputs is None and args.select_setting:
        inputs = "both"
    if inputs is None:
        inputs = "noisy" if args.noisy_input else "clean"
    noisy = {"clean": [False], "noisy": [True], "both": [False, True]}[inputs]
    return [(d, t, n) for d in depths for t in ts for n in noisy]


def head_name(key):
    depth, t, noisy = key
    suffix = "_noisy" if noisy else ""
    return f"depth{depth}_t{t}{suffix}"


def print_grid(keys, results):
    """DDAE-style table of val top-1: rows depth, columns t (suffix n: noisy input)."""
    levels = sorted({k[1:] for k in keys})
    names = [f"{t}n" if noisy else f"{t}" for t, noisy in levels]
    print("depth \\ t " + "".join(f"{n:>8}" for n in names))
    for d in sorted({k[0] for k in keys}):
        print(f"{d:>9} " + "".join(f"{results[(d, *level)][1]:8.2f}" for level in levels))


def compare(args):
    """--compare: the learned features, a random-init network of the same config and raw
    pixels through the same data, probe and selection; one table, one final JSON line."""
    if args.grid or args.random_init or args.baseline:
        raise UserError("--compare runs the learned, --random-init and --baseline pixels probes itself: "
                        "drop --grid/--random-init/--baseline")
    runs = {}
    for name, kw in [("learned", {}), ("random_init", {"random_init": True}), ("pixels", {"baseline": "pixels"})]:
        runs[name] = main(argparse.Namespace(**{**vars(args), "compare": False, **kw,
                                                "output_dir": os.path.join(args.output_dir, name)}))
    print(f"{'features':<46}{'top-1':>8}{'top-5':>8}")
    for r in runs.values():
        print(f"{r['features'][:45]:<46}{r['top1']:8.2f}{r['top5']:8.2f}")
    res = {**{k: runs["learned"][k] for k in ("top1", "top5", "protocol", "features", "depth", "t")},
           **{f"{n}_{k}": runs[n][k] for n in ("random_init", "pixels") for k in ("top1", "top5")},
           "solver": runs["learned"].get("solver")}
    print(json.dumps(res), flush=True)
    return res


def main(args):
    if getattr(args, "compare", False):
        return compare(args)
    t_start = time.time()
    # several probe settings, the best chosen on held-out train
    select = args.grid or args.select_setting
    protocol = args.protocol or ("cached" if select else "mae")
    pixels = args.baseline == "pixels"
    for bad, msg in [(select and protocol == "mae",
                      "--grid and --select-setting need --protocol cached (features are stored "
                      "once)"),
                     (args.probe_t is not None and args.probe_t < 0, "--probe-t must be >= 0"),
                     (args.views > 1 and protocol == "mae", "--views is for --protocol cached; mae augments every epoch"),
                     (pixels and (args.random_init or args.grid), "--baseline pixels has no network: drop --random-init/--grid"),
                     (not args.ckpt and not pixels, "give the checkpoint to probe: python linprobe.py CKPT ..."),
                     (min(args.views, args.epochs, args.batch_size) < 1, "--views, --epochs and --batch-size must be >= 1"),
                     (not 0 <= args.warmup_epochs < args.epochs, "--warmup-epochs must be in [0, --epochs)"),
                     (not 0 < args.holdout < 1, "--holdout must be a fraction in (0, 1)")]:
        if bad:
            raise UserError(msg)
    rank, world, device = pretrain.setup_distributed()
    if rank == 0:
        data.check_writable_dir(args.output_dir, "--output-dir")
    model = None if pixels else load_backbone(args, device)   # pixels: a checkpoint only fixes the size
    cfg = model.config if model else pretrain.load_checkpoint(args.ckpt)["model_config"] if args.ckpt else {}
    S = cfg.get("img_size")
    if args.input_size is None:
        args.input_size = S or 32
    elif S and args.input_size != S:
        raise UserError(f"the checkpoint's model takes {S}x{S} images (fixed position embedding), not "
                        f"--input-size {args.input_size}; drop --input-size or pass {S}")
    S = args.input_size
    before = checksum(model) if model is not None else None
    L = cfg.get("depth", 0)                     # grid default: depths around the encoder's end (RECIPE s5)
    depths = (args.grid_depths or list(range(max(1, L // 4), 3 * L // 4 + 1, max(1, L // 8)))) if args.grid else \
        [args.probe_depth or L // 2]
    keys = [(None, None, False)] if pixels else probe_keys(args, depths, model)
    steps = cfg.get("num_steps", 1000)
    if not pixels and not all(0 <= k[1] < steps for k in keys):
        raise UserError(f"probe levels t must be in 0..{steps - 1} (the model's noise steps), got "
                        f"{sorted({k[1] for k in keys})}")
    if not pixels and not all(1 <= d <= L for d in depths):
        raise UserError(f"probe depths must be in 1..{L} (the blocks of {cfg.get('name')}), got {depths}")
    tf_eval = data.build_transform("eval", S)
    tf_rrc = data.build_transform("rrc", S, scale=(0.08, 1.0))          # MAE's probe crop scale
    train_ds = data.build_dataset(args, "train", tf_rrc if protocol == "mae" else tf_eval)
    train_sets = [train_ds]
    if protocol == "cached" and args.views > 1:  # views 1..K-1: random crops of the train set
        train_sets.append(data.build_dataset(args, "train", tf_rrc))
    val_ds = data.build_dataset(args, "val", tf_eval)
    C = data.num_classes(train_ds)
    if data.num_classes(val_ds) != C or (args.nb_classes or C) != C:
        raise UserError(f"class counts do not fit: train has {C}, val {data.num_classes(val_ds)}, "
                        f"--nb-classes {args.nb_classes}; point --data-path at matching splits")
    if (shape := tuple(val_ds[0][0].shape)) != (cfg.get("in_chans", 3), S, S):
        raise UserError(f"images come out as {shape}, the model takes {(cfg.get('in_chans', 3), S, S)}")
    featurize = make_featurizer(model, keys, args)
    base_lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if rank == 0:
        data.atomic_write(log_path, lambda tmp: data.write_lines(tmp, []))   # a fresh log

    def log(rec, echo=False):
        if rank != 0:
            return
        try:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise data.write_error(e, log_path) from None
        if echo:
            print(json.dumps(rec), flush=True)
    t0 = time.time()
    if protocol == "mae":
        results, t_feat = {keys[0]: probe_mae(featurize, keys[0], train_ds, val_ds, base_lr, args, C, device,
                                              rank, world, log)}, None
    else:
        tr, ytr, va, yva = cached_features(featurize, keys, train_sets, val_ds, args, device, rank, world)
        t_feat, t0 = time.time() - t0, time.time()
        results = {k: probe_cached(tr[k], ytr, va[k], yva, base_lr, args, C, device, log,
                                   {"depth": k[0], "t": k[1], "noisy": k[2]}) for k in keys}
    t_head = time.time() - t0
    if not (unchanged := before is None or torch.equal(before, checksum(model))):
        raise RuntimeError("the frozen backbone's weights changed during probing")   # a bug: no number
    # The headline setting of a grid is chosen on the held-out split (its best top-1), never val.
    best = max(keys, key=lambda k: results[k][3].get("heldout_top1", 0.0)) if len(keys) > 1 else keys[0]
    _, top1, top5, info = results[best]
    what = ("raw pixels (flattened, <= 32x32x3)" if pixels else
            f"random-init {cfg.get('name')} (active blocks)" if args.random_init else
            f"{cfg.get('name')} checkpoint ({getattr(args, 'weights_used', args.weights)} weights)")
    res = {"top1": round(top1, 2), "top5": round(top5, 2), "protocol": protocol, "features": what, "depth": best[0],
           "t": best[1], "noisy_input": best[2], **info, "checkpoint": args.ckpt,
           "dataset": args.dataset, "input_size": S, "num_classes": C, "n_train": len(train_ds), "n_val": len(val_ds),
           **{k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size", "views", "seed")},
           "backbone_unchanged": unchanged, "seconds_features": t_feat and round(t_feat, 2),
           "seconds_head": round(t_head, 2), "seconds_total": round(time.time() - t_start, 2)}
    short = {k: {"top1": round(r[1], 2), "top5": round(r[2], 2), **{n: r[3][n] for n in ("lr", "wd", "heldout_top1")
                                                                 if n in r[3]}} for k, r in results.items()}
    if len(keys) > 1:
        res["grid"] = [{"depth": k[0], "t": k[1], "noisy": k[2], **v} for k, v in short.items()]
    if rank == 0:
        data.save_torch({"heads": {head_name(k): {**r[0], **short[k]} for k, r in results.items()},
                         "settings": {k: v for k, v in res.items() if k != "grid"}},
                        os.path.join(args.output_dir, "head.pt"))
        if len(keys) > 1:                       # DDAE-style table: rows depth, columns t, val top-1
            print_grid(keys, results)
        setting = f"depth {best[0]}, t {best[1]}, {'noisy' if best[2] else 'clean'} input"
        print(f"top-1 {top1:.2f}  top-5 {top5:.2f}  ({what}; {protocol}; {setting})")
        print(json.dumps(res), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return res


def get_args_parser():
    ints, floats = (lambda s: [int(v) for v in s.split(",")]), (lambda s: [float(v) for v in s.split(",")])
    num = data.bounded
    p = data.ArgumentParser(prog="linprobe.py", description="Linear probe of a frozen l-DAE / "
                            "DiT encoder (RECIPE.md s5)")
    add = p.add_argument
    add("ckpt", nargs="?", help="checkpoint of pretrain.py (optional with --baseline pixels)")
    add("--protocol", choices=("mae", "cached"), help="default: mae (the paper's); cached with --grid")
    add("--epochs", type=num(int, 1), default=90, help="probe epochs")
    add("--warmup-epochs", type=num(int, 0), default=10, help="linear warmup epochs")
    add("--batch-size", type=num(int, 1), default=16384, help="global batch (all ranks and micro-batches)")
    add("--blr", type=num(float, 0), default=0.1, help="lr = blr * batch / 256 (MAE: 6.4 at 16384)")
    add("--lr", type=num(float, 0), default=None,
        help="absolute lr (overrides --blr; the paper's 6.4e-3 is the per-step relative move "
             "under LARS, i.e. lr 6.4 here)")
    add("--accum-iter", type=num(int, 1), default=None, help="mae: micro-batches per step (default: auto)")
    add("--max-device-batch", type=num(int, 1), default=1024, help="images per forward on one device")
    add("--weights", choices=("ema", "raw"), default="ema")
    add("--probe-t", type=num(int, 0), default=None,
        help="noise level the network is told (default: 10, the paper's; a single-level model: "
             "the level it was trained at)")
    add("--probe-depth", type=num(int, 1), default=None, help="block to read (default: last encoder block)")
    add("--noisy-input", action="store_true", help="add level-t noise to the input (paper Sec. 5)")
    add("--random-init", action="store_true", help="baseline: fresh weights, active blocks")
    add("--baseline", choices=("pixels",), default=None, help="baseline: probe raw pixels")
    add("--compare", action="store_true", help="learned vs --random-init vs --baseline pixels, one table")
    add("--views", type=num(int, 1), default=1, help="cached: center crop + K-1 random crops per image")
    add("--grid", action="store_true", help="a head per (depth, t) pair (DDAE protocol)")
    add("--grid-depths", type=ints, default=None, help="e.g. 6,9,12 (default: around depth/2)")
    add("--grid-ts", type=ints, default=[0, 10, 20, 40, 80],
        help="t values of --grid and --select-setting (RECIPE s5's)")
    add("--grid-inputs", choices=("clean", "noisy", "both"), default=None,
        help="inputs of --grid / --select-setting (default: clean; both with --select-setting)")
    add("--select-setting", action="store_true",
        help="the paper's Table 4 probe: the best (t, clean/noisy input) chosen on held-out train")
    add("--solver", choices=("lbfgs", "lars"), default="lbfgs", help="cached: converge, or mae's LARS")
    add("--wd-grid", type=floats, default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1], help="cached lbfgs: L2 values swept")
    add("--lr-grid", type=floats, default=[0.25, 0.5, 1, 2, 4], help="cached lars: lr factors swept")
    add("--holdout", type=num(float, 0, 1, low_open=True, high_open=True), default=0.1, help="cached: train fraction that does the choosing")
    add("--max-iter", type=num(int, 1), default=500, help="cached lbfgs: iteration cap")
    add("--spread", action="store_true", help="cached: also report val top-1 per grid value")
    add("--compile", action="store_true", help="torch.compile the feature pass")
    add("--nb-classes", type=num(int, 1), default=None, help="expected class count (checked)")
    add("--seed", type=int, default=0)
    add("--output-dir", default="out/probe")
    data.add_data_args(p)
    p.set_defaults(input_size=None)             # default: the checkpoint model's img_size
    return p


if __name__ == "__main__":
    data.run_cli(main, get_args_parser())
