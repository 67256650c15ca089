"""What linprobe.py runs on a frozen encoder (RECIPE s5). (1) The encoder and its feature pass:
the checkpoint loaded strictly, the (depth, t, clean/noisy) settings it can give, one pass over a
data set (sharded under torchrun). (2) The heads: the linear probe (BatchNorm1d without affine +
Linear) on MAE's LARS schedule (probe_mae: fresh crops through the encoder every epoch;
probe_cached --solver lars: cached features) or solved to convergence by L-BFGS (probe_cached),
and DINO's weighted k-NN (probe_knn), which trains nothing. The choice of protocol, the data
sets, the settings block and the report are linprobe.py's.
"""
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import cli
import dit_baseline
import pretrain                                   # checkpoints and their models
import trainer
from cli import UserError

# The k-NN similarity matrix of one chunk of val images holds at most this many entries (1 GiB in
# float32): ~200 val images at a time against ImageNet's 1.28M train features.
KNN_CHUNK_ENTRIES = 2**28


# ---- The frozen encoder and its one feature pass
def checksum(model):
    """(n, 2) float64 sum and sum of squares of every float tensor of the model."""
    rows = [[t.double().sum(), t.double().square().sum()] for t in model.state_dict().values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.tensor(rows, dtype=torch.float64)


def load_backbone(args, device):
    """Rebuild the model from the checkpoint's config, load strictly (pretrain's contract: a
    missing/foreign file or missing/unexpected keys are UserErrors naming the problem)."""
    ckpt = pretrain.load_checkpoint(args.ckpt)
    model = pretrain.model_from_checkpoint(ckpt, args.weights, "cpu")
    args.weights_used = "raw"                                              # for the report
    if ckpt.get("ema") is not None:
        args.weights_used = args.weights
    preset = ckpt.get("args", {}).get("preset")
    if preset in dit_baseline.TABLE4_PRESETS and not args.select_setting:
        print(f"[probe] note: the paper probes {preset} (Table 4) at "
              f"{dit_baseline.PAPER_PROBE[preset]}; this run uses one fixed setting", flush=True)
    if args.random_init:
        # The random-init baseline: same network, fresh weights, every block live. The
        # checkpoint gives only the config and the PCA tokenizer (fitted, not learned: RECIPE s2).
        torch.manual_seed(args.seed)
        model.init_weights(active=True)
        print(f"[probe] --random-init: freshly initialised {model.config.get('name')} with "
              f"ACTIVE blocks (init_weights(active=True): adaLN gates open); checkpoint weights "
              f"unused", flush=True)
    return model.to(device).eval().requires_grad_(False)


def make_featurizer(model, keys, args):
    """-> f(images (B, 3, S, S)) -> {(depth, t, noisy): (B, D) float32}. One forward_features pass
    per (t, clean or noisy input) returns every requested depth (RECIPE s5 probe depth/t/input
    ablations, DDAE grid). model None: --baseline pixels, <= 32x32x3 = 3072 dims, area-averaged."""
    if model is None:
        def pixels(x):
            if x.shape[-1] > 32:
                x = F.adaptive_avg_pool2d(x, 32)
            return {keys[0]: x.flatten(1).float()}
        return pixels
    depths = sorted({key[0] for key in keys})
    levels = sorted({key[1:] for key in keys})      # (t, noisy) pairs
    forward = model.forward_features
    if args.compile:
        forward = torch.compile(model.forward_features)

    def features(x):
        out = {}
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):    # bf16: the fast path
            for t, noisy in levels:
                for depth, f in zip(depths, forward(x, t=t, depth=depths, noisy=noisy)):
                    out[(depth, t, noisy)] = f.float()
        return {key: out[key] for key in keys}
    return features


def extract(featurize, ds, args, device, rank, world, desc):
    """One encoder pass -> ({key: (N, D)} on CPU, labels (N,)). Under torchrun rank r takes items
    r, r+W, ...; the shards are gathered and interleaved back into dataset order."""
    loader = DataLoader(Subset(ds, range(rank, len(ds), world)), batch_size=args.max_device_batch,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
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


def cached_features(featurize, keys, centre_ds, crops_ds, val_ds, args, device, rank, world):
    """-> {key: (V, N, D)}, train labels (N,), {key: (M, D)}, val labels (M,), all on the CPU."""
    per_view = []
    for view in range(args.views):              # view 0: center crop (as val); then random crops
        torch.manual_seed(args.seed + view)     # worker seeds derive from it: reproducible crops
        ds = centre_ds if view == 0 else crops_ds
        per_view.append(extract(featurize, ds, args, device, rank, world, f"train view {view}"))
    val_x, val_y = extract(featurize, val_ds, args, device, rank, world, "val")
    train_x = {key: torch.stack([f[key] for f, _ in per_view]) for key in keys}
    return train_x, per_view[0][1], val_x, val_y


def probe_keys(args, depths, model):
    """The (depth, t, noisy) settings to probe. One setting by default: the last encoder block,
    --probe-t (default: the model's probe_t, 10, or a single-level model's own level) and a clean
    input (--noisy-input: noisy). --grid: every --grid-depths x --grid-ts. --select-setting: the
    paper's Table 4 "optimal setting", every --grid-ts with clean and with noisy input at the
    probe depth. --grid-inputs overrides which inputs. The best is chosen on held-out train."""
    select = args.grid or args.select_setting
    ts = args.grid_ts
    if not select:
        ts = [model.probe_t if args.probe_t is None else args.probe_t]
    inputs = args.grid_inputs
    if inputs is None and args.select_setting:
        inputs = "both"
    if inputs is None:
        inputs = "noisy" if args.noisy_input else "clean"
    noisy = {"clean": [False], "noisy": [True], "both": [False, True]}[inputs]
    return [(depth, t, n) for depth in depths for t in ts for n in noisy]


def check_probe_keys(args, cfg, pixels, model):
    """The input size, depths and levels the checkpoint's model can take -> (size, keys)."""
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
    keys = probe_keys(args, depths, model)
    steps = cfg.get("num_steps", 1000)
    if not all(0 <= key[1] < steps for key in keys):
        raise UserError(f"probe levels t must be in 0..{steps - 1} (the model's noise steps), "
                        f"got {sorted({key[1] for key in keys})}")
    if not all(1 <= depth <= blocks for depth in depths):
        raise UserError(f"probe depths must be in 1..{blocks} (the blocks of {cfg.get('name')}), "
                        f"got {depths}")
    return args.input_size, keys


# ---- Linear heads: LARS on the probe schedule, L-BFGS to convergence
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's linear probe uses it, written from its definition. Per step,
    for each parameter p with gradient g:
        ndim > 1 (weights):  u = g + wd p;  u <- u * eta ||p|| / ||u||  (when both norms > 0)
        1-D (biases, BN):    u = g          (no decay, no trust ratio)
        m <- momentum m + u;  p <- p - lr m
    A weight matrix moves by a fixed fraction (~lr * eta) of its norm per step: stable at batch
    16384 and lr 6.4, but slow when there are few steps (small data sets; see probe_cached)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * p_norm / u_norm
                    update = update * torch.where((p_norm > 0) & (u_norm > 0), trust, 1.0)
                momentum = self.state[p].setdefault("mu", torch.zeros_like(p))
                momentum.mul_(group["momentum"]).add_(update)
                p.add_(momentum, alpha=-group["lr"])


def make_head(dim, num_classes):
    """RECIPE s5 / MAE: BN without affine (a parameter-free standardiser), Linear init std 0.01."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def lr_at(epoch, base_lr, warmup, epochs):
    # MAE's: set every iteration on the fractional epoch, linear warmup + half-cycle cosine to 0
    return trainer.lr_at(epoch, 1, base_lr, warmup, epochs)


def train_head(head, batches, n_batches, accum, base_lr, args, log, tag, net=None):
    """The probe schedule both protocols share (RECIPE s5 / MAE): LARS, wd 0, lr set every
    optimizer step (linear warmup, half-cycle cosine). batches(epoch) yields n_batches
    micro-batches (features (b, D), labels (b,)); `accum` of them make one step of the global
    batch. net: what computes the logits (the head, or its DDP wrapper)."""
    net = net or head
    opt = LARS(head.parameters(), lr=base_lr)
    for epoch in range(args.epochs):
        head.train()
        total = 0.0
        start = time.time()
        for i, (features, labels) in enumerate(batches(epoch)):
            step_start = i // accum * accum
            if i == step_start:
                lr = lr_at(epoch + i / n_batches, base_lr, args.warmup_epochs, args.epochs)
                opt.param_groups[0]["lr"] = lr
            loss = F.cross_entropy(net(features), labels)
            # the mean over the micro-batches this step really has (a small set's only step may
            # have fewer than accum); under DDP every micro-batch all-reduces: a tiny head
            in_step = min(accum, n_batches - step_start)
            (loss / in_step).backward()
            if i + 1 == step_start + in_step:
                opt.step()
                opt.zero_grad(set_to_none=True)
            total = total + loss.detach()      # summed on the device: one host sync per epoch
        log({**tag, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
             "train_loss": float(total) / max(n_batches, 1),
             "seconds": round(time.time() - start, 2)})
    return head


def fit_lars(train_x, train_y, eval_x, eval_y, lr, args, num_classes, device, seed, log=None,
             tag=None):
    """The mae schedule on cached features (drop_last like MAE) -> (head, top1 %, top5 %) on
    eval_x (M, D). train_x (V, N, D): each epoch draws one of the V views of every image."""
    n_views, n, dim = train_x.shape
    torch.manual_seed(seed)
    head = make_head(dim, num_classes).to(device)
    generator = torch.Generator().manual_seed(seed)
    batch = min(args.batch_size, n)
    train_x = train_x.to(device)
    train_y = train_y.to(device)

    def batches(epoch):
        order = torch.randperm(n, generator=generator).to(device)
        view = torch.randint(n_views, (n,), generator=generator).to(device)
        for i in range(n // batch):
            idx = order[i * batch:(i + 1) * batch]
            yield train_x[view[idx], idx], train_y[idx]                # (batch, D), (batch,)
    train_head(head, batches, n // batch, 1, lr, args, log or (lambda rec: None), tag or {})
    return head, *evaluate(head, eval_x, eval_y, device)


@torch.no_grad()
def evaluate(head, x, y, device, chunk=65536):
    """x (M, D) -> [top1 %, top5 %] of the head's logits."""
    head.eval()
    hits = torch.zeros(2)
    for i in range(0, len(x), chunk):
        logits = head(x[i:i + chunk].to(device))                        # (b, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[i:i + chunk, None].to(device)
        hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).cpu()  # top-1, top-5 hits
    return (100.0 * hits / max(1, len(x))).tolist()


def fit_lbfgs(train_x, train_y, eval_x, eval_y, wd, args, num_classes, device, seed, log=None,
              tag=None):
    """The same head solved to convergence: multinomial logistic regression, full-batch
    L-BFGS (strong-Wolfe line search), L2 wd/2 ||W||^2. Convex: the optimum depends on neither
    init, lr nor schedule, only on wd. BN keeps running stats (0, 1): identity on whitened
    inputs."""
    n_views, n, dim = train_x.shape
    x = train_x.reshape(n_views * n, dim).to(device)                   # view-major rows
    y = train_y.repeat(n_views).to(device)
    torch.manual_seed(seed)
    head = make_head(dim, num_classes).to(device).eval()
    linear = head[1]
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=args.max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(linear(x), y) + 0.5 * wd * linear.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)                           # runs up to --max-iter iterations
    if log:
        log({**(tag or {}), "wd": wd, "train_loss": float(closure().detach()),
             "iterations": opt.state[linear.weight]["n_iter"]})
    return head, *evaluate(head, eval_x, eval_y, device)


def feature_map(x, whiten, chunk=65536):
    """TRAIN statistics -> mean (D,), map P (D, r): (x - mean) @ P is standardised (what BN
    converges to) or PCA-whitened. Whitening is invertible on the data's span, so the probe's
    function class is unchanged, only its conditioning: network features have effective rank ~1.1
    and standardised L-BFGS took > 2000 iterations where whitened took ~300 (measured).
    Zero-variance directions (grayscale's repeated channels) are dropped. Float64 sums, chunked."""
    n, dim = x.shape
    starts = range(0, n, chunk)
    mean = sum(x[i:i + chunk].double().sum(0) for i in starts) / n                   # (D,)
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    for i in starts:
        centred = x[i:i + chunk].double() - mean
        cov += centred.T @ centred
    cov /= n                                                                           # (D, D)
    if not whiten:
        sd = cov.diagonal().clamp_min(0).sqrt()
        scale = torch.where(sd > 1e-6, 1 / sd, torch.ones_like(sd))
        return mean.float(), torch.diag(scale).float()
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    keep = eigenvalues > 1e-8 * eigenvalues.max()
    return mean.float(), (eigenvectors[:, keep] / eigenvalues[keep].sqrt()).float()


def probe_cached(train_x, train_y, val_x, val_y, base_lr, args, num_classes, device, log, tag):
    """Optimisation must not decide the ranking. (1) Normalise with TRAIN statistics
    (whitened for lbfgs; standardised for lars, which mimics `mae`). (2) Choose the one free
    setting (lbfgs: L2 from --wd-grid; lars: lr from --lr-grid x base lr) by top-1 on a seeded
    held-out part of TRAIN (all views of a held-out image held out), retrain on all of train,
    score val once: val labels reach nothing else (--spread only reports).
    -> (state to save, top1 %, top5 %, info)."""
    n_views, n, dim = train_x.shape
    lbfgs = args.solver == "lbfgs"
    mean, projection = feature_map(train_x.reshape(n_views * n, dim), whiten=lbfgs)
    train_x = (train_x - mean) @ projection
    val_x = (val_x - mean) @ projection
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_held = max(1, round(n * args.holdout))
    held_out, kept = order[:n_held], order[n_held:]
    if lbfgs:
        solve, name, grid = fit_lbfgs, "wd", args.wd_grid
    else:
        solve, name, grid = fit_lars, "lr", [base_lr * factor for factor in args.lr_grid]
    heldout_top1 = {}
    for value in cli.progress(iterable=grid, desc=f"{name} sweep {tag}", leave=False):
        # view 0 = the center crop, as val
        heldout_top1[value] = solve(train_x[:, kept], train_y[kept], train_x[0, held_out],
                                    train_y[held_out], value, args, num_classes, device,
                                    args.seed)[1]
    best = max(grid, key=heldout_top1.get)                             # ties: the first (smaller)
    head, top1, top5 = solve(train_x, train_y, val_x, val_y, best, args, num_classes, device,
                             args.seed, log, tag)
    info = {"solver": "L-BFGS to convergence" if lbfgs else "LARS, probe schedule", name: best,
            "selection": f"best top-1 on a held-out {args.holdout:.0%} of train (seed "
                         f"{args.seed}) over {name} {grid}, then retrained on all of train",
            "features_normalised": "whitened" if lbfgs else "standardised",
            "heldout_top1": round(heldout_top1[best], 2),
            f"heldout_top1_by_{name}": {f"{k:g}": round(v, 2) for k, v in heldout_top1.items()}}
    if args.spread:                             # measurement only, never used to choose
        info[f"val_top1_by_{name}"] = {
            f"{value:g}": round(solve(train_x, train_y, val_x, val_y, value, args, num_classes,
                                      device, args.seed)[1], 2) for value in grid}
    state = {"head": {k: v.cpu() for k, v in head.state_dict().items()}, "feature_mean": mean,
             "feature_map": projection}
    return state, top1, top5, info


def mae_layout(args, world, n_train):
    """The mae protocol's batch, the one place it is split: --batch-size over the ranks, then
    over micro-batches of at most --max-device-batch (or --accum-iter of them) per step. MAE
    drops the last partial batch, but a set smaller than one global batch keeps all its images
    (one partial step per epoch). -> dict."""
    per_rank = args.batch_size // world
    accum = args.accum_iter or -(-per_rank // args.max_device_batch)
    micro = max(1, per_rank // accum)
    full = n_train // world >= per_rank
    samples = -(-n_train // world)              # DistributedSampler pads to equal shards
    batches = samples // micro
    if not full:
        batches = -(-samples // micro)
    return {"accum": accum, "micro": micro, "drop_last": full, "batches": batches,
            "steps": -(-batches // accum), "first_step": min(accum, batches)}


def probe_mae(featurize, key, train_ds, val_x, val_y, base_lr, args, num_classes, device, rank,
              world, log):
    """The paper's protocol (RECIPE s5 = MAE's linear probe): the frozen encoder sees a fresh
    RandomResizedCrop + flip of every image each epoch; the head is scored on val_x (M, D)."""
    layout = mae_layout(args, world, len(train_ds))
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, world, rank, seed=args.seed)
    loader = DataLoader(train_ds, layout["micro"], shuffle=sampler is None, sampler=sampler,
                        num_workers=args.num_workers, drop_last=layout["drop_last"],
                        generator=torch.Generator().manual_seed(args.seed),
                        pin_memory=device.type == "cuda")
    torch.manual_seed(args.seed)
    head = make_head(val_x.shape[1], num_classes).to(device)

    def batches(epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in cli.progress(iterable=loader, desc=f"epoch {epoch + 1}", disable=rank != 0,
                                 leave=False):
            with torch.inference_mode():        # frozen backbone: eval mode, no graph
                f = featurize(x.to(device, non_blocking=True))[key]     # (b, D)
            # clone: a normal tensor, which the head's autograd may save
            yield f.clone(), y.to(device)
    ddp_head = None
    if world > 1:
        ddp_head = nn.parallel.DistributedDataParallel(head)
    train_head(head, batches, len(loader), layout["accum"], base_lr, args,
               lambda rec: log(rec, echo=True), {}, ddp_head)
    top1, top5 = evaluate(head, val_x, val_y, device)
    info = {"solver": "LARS, probe schedule", "lr": base_lr,
            "selection": "fixed (MAE: --blr * batch / 256, or --lr)",
            "features_normalised": "BN only", "accum_iter": layout["first_step"],
            "device_batch": layout["micro"]}
    return {"head": {k: v.cpu() for k, v in head.state_dict().items()}}, top1, top5, info


# ---- Weighted k-NN (DINO, Caron et al. 2021, after Wu et al. 2018): nothing trains, nothing is
# chosen; the features alone decide.
def nearest(sim, k):
    """The k largest entries of each row of sim (b, N) -> (values, indices), both (b, k). A tie at
    the k-th place goes to the lower index (the earlier train image), so the neighbours are a
    function of the data, not of topk's internal order. Only tied rows pay for a full sort."""
    if k == sim.shape[1]:
        return sim.sort(dim=1, descending=True, stable=True)
    values, indices = sim.topk(k + 1, dim=1)
    tied = values[:, k - 1] == values[:, k]
    if tied.any():
        tied_values, tied_indices = sim[tied].sort(dim=1, descending=True, stable=True)
        values[tied] = tied_values[:, :k + 1]
        indices[tied] = tied_indices[:, :k + 1]
    return values[:, :k], indices[:, :k]


@torch.no_grad()
def knn_scores(train_x, train_y, val_x, num_classes, k, temperature, device, chunk=None):
    """Each val image's class scores (M, C): features L2-normalised, similarity the cosine, and
    each of its k most similar train images votes for its own label with weight exp(sim / T).
    Val goes in chunks (chunk x N similarities at a time, KNN_CHUNK_ENTRIES by default) on
    `device`; train features stay there for the whole pass."""
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k = {k} needs 1..{len(train_x)} train features")
    train_x = F.normalize(train_x.to(device).float(), dim=1)          # (N, D)
    train_y = train_y.to(device)
    rows = chunk or max(1, KNN_CHUNK_ENTRIES // len(train_x))
    scores = []
    for i in range(0, len(val_x), rows):
        queries = F.normalize(val_x[i:i + rows].to(device).float(), dim=1)   # (b, D)
        similarity, neighbours = nearest(queries @ train_x.T, k)            # (b, k) each
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, train_y[neighbours], weights)
        scores.append(votes.cpu())
    return torch.cat(scores)


def top1_top5(scores, labels):
    """scores (M, C) -> [top1 %, top5 %]; equal scores rank the lower class first."""
    ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]
    hits = ranked == labels[:, None]
    return [100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(1).float().mean().item()]


def probe_knn(train_x, train_y, val_x, val_y, args, num_classes, device):
    """The k-NN figure of one feature set (train view 0: the center crop) -> result fields."""
    scores = knn_scores(train_x, train_y, val_x, num_classes, args.knn_k, args.knn_t, device)
    top1, top5 = top1_top5(scores, val_y)
    return {"knn_top1": round(top1, 2), "knn_top5": round(top5, 2), "knn_k": args.knn_k,
            "knn_t": args.knn_t}
