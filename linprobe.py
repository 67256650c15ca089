"""Linear probe of a frozen l-DAE (or DiT-baseline) encoder, the figure every table of the paper
reports (RECIPE s5): only a BatchNorm1d(affine=False) + Linear head trains, never the backbone.
--protocol mae is the paper's ("follows MAE"); cached and knn are in util/probe_cached.py, knn.py.

  python linprobe.py out/tiny/checkpoint.pt --compare          # small set: auto runs cached
  torchrun --nproc_per_node=8 linprobe.py out/vit_b/checkpoint.pt --dataset imagefolder \\
      --data-path IMNET                                          # auto runs mae, the paper's
"""
import argparse
import functools
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from util import cli, datasets, distributed, features, files, knn, lr_sched, probe_cached
from util import registry, transforms
from util.checkpoint import RunLog
from util.cli import UserError
from util.lars import LARS

# --protocol auto: MAE's warmup + cosine is the paper's schedule only with this many steps per
# epoch (ImageNet at batch 16384: 78); a small set's one or two, mostly warmup, get cached instead.
AUTO_MIN_STEPS = 20
PAPER = {"mae": "the paper's protocol (MAE's linear probe)",
         "cached": "not the paper's (mae): its head on one center-crop feature pass",
         "knn": "not in the paper: DINO's weighted k-NN on one center-crop feature pass"}
OUTPUTS = ("probe_log.jsonl", "head.pt")     # a pretraining folder's log.jsonl is never touched
COMPARE_ROWS = [("learned", {}), ("random_init", {"random_init": True}),
                ("pixels", {"baseline": "pixels", "clean_input": "projected"})]


# ---- MAE's linear probe: the paper's protocol -------------------------------------------------
def make_head(dim, num_classes):
    """RECIPE s5 / MAE: BN without affine (a parameter-free standardiser), Linear init std 0.01."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def train_head(head, batches, n_batches, accum, base_lr, args, log, tag, net=None):
    """MAE's probe (RECIPE s5): LARS, wd 0, warmup + cosine lr per step of `accum` batches."""
    opt = LARS(head.parameters(), lr=base_lr)
    for epoch in range(args.epochs):
        head.train()
        start, total = time.time(), 0.0
        for i, (x, y) in enumerate(batches(epoch)):
            step_start = i // accum * accum
            if i == step_start:
                opt.param_groups[0]["lr"] = lr_sched.lr_at(epoch + i / n_batches, 1, base_lr,
                                                           args.warmup_epochs, args.epochs)
            loss = F.cross_entropy((net or head)(x), y)
            # a small set's one step may hold < accum; DDP syncs each micro-batch (a tiny head)
            in_step = min(accum, n_batches - step_start)
            (loss / in_step).backward()
            if i + 1 == step_start + in_step:
                opt.step()
                opt.zero_grad(set_to_none=True)
            total = total + loss.detach()       # one host sync per epoch, below
        log({**tag, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
             "train_loss": float(total) / max(n_batches, 1),
             "seconds": round(time.time() - start, 2)})
    return head


def mae_layout(args, world, n_train):
    """--batch-size over ranks and micro-batches; MAE's drop_last, unless under one global batch."""
    per_rank = args.batch_size // world
    accum = args.accum_iter or -(-per_rank // args.max_device_batch)
    micro = max(1, per_rank // accum)
    full = n_train // world >= per_rank
    samples = -(-n_train // world)              # DistributedSampler pads to equal shards
    batches = samples // micro if full else -(-samples // micro)
    return {"accum": accum, "micro": micro, "drop_last": full, "batches": batches,
            "steps": -(-batches // accum), "first_step": min(accum, batches)}


def probe_mae(featurize, key, val_x, val_y, args, run, device, rank, log):
    """The paper's protocol: a fresh RandomResizedCrop + flip of each image every epoch."""
    layout = mae_layout(args, run.world, run.n_train)
    torch.manual_seed(args.seed)
    head = make_head(val_x.shape[1], run.num_classes).to(device)
    sampler, ddp_head = None, None
    if run.world > 1:
        sampler = torch.utils.data.DistributedSampler(run.crops_ds, run.world, rank, seed=args.seed)
        ddp_head = nn.parallel.DistributedDataParallel(head)
    loader = DataLoader(run.crops_ds, layout["micro"], shuffle=sampler is None, sampler=sampler,
                        num_workers=args.num_workers, drop_last=layout["drop_last"],
                        generator=torch.Generator().manual_seed(args.seed),
                        pin_memory=device.type == "cuda",
                        worker_init_fn=distributed.ignore_stop_signals)

    def batches(epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in cli.progress(iterable=loader, desc=f"epoch {epoch + 1}", disable=rank != 0,
                                 leave=False):
            with torch.inference_mode():        # frozen backbone: eval mode, no graph
                f = featurize(x.to(device, non_blocking=True))[key]     # (b, D)
            yield f.clone(), y.to(device)       # clone: a tensor the head's autograd may save
    train_head(head, batches, len(loader), layout["accum"], run.base_lr, args,
               functools.partial(log, echo=True), {}, ddp_head)
    top1, top5 = probe_cached.evaluate(head, val_x, val_y, device)
    info = {"solver": "LARS, probe schedule", "lr": run.base_lr,
            "selection": "fixed (MAE: --blr * batch / 256, or --lr)",
            "features_normalised": "BN only", "accum_iter": layout["first_step"],
            "device_batch": layout["micro"]}
    return {"head": {k: v.cpu() for k, v in head.state_dict().items()}}, top1, top5, info


def fit_lars(train_x, train_y, eval_x, eval_y, lr, args, num_classes, device, seed, log=None,
             tag=None):
    """--solver lars: MAE's schedule on cached train_x (V, N, D), a random view of each image."""
    n_views, n, dim = train_x.shape
    torch.manual_seed(seed)
    head = make_head(dim, num_classes).to(device)
    generator = torch.Generator().manual_seed(seed)
    batch = min(args.batch_size, n)
    train_x, train_y = train_x.to(device), train_y.to(device)

    def batches(epoch):
        order = torch.randperm(n, generator=generator).to(device)
        view = torch.randint(n_views, (n,), generator=generator).to(device)
        for i in range(n // batch):
            idx = order[i * batch:(i + 1) * batch]
            yield train_x[view[idx], idx], train_y[idx]                # (batch, D), (batch,)
    train_head(head, batches, n // batch, 1, lr, args, log or (lambda rec: None), tag or {})
    return head, *probe_cached.evaluate(head, eval_x, eval_y, device)


def cached_solver(args, base_lr):
    """--protocol cached -> (fit, setting, values): L-BFGS over --wd-grid or LARS over --lr-grid."""
    if args.solver == "lbfgs":
        return functools.partial(probe_cached.fit_lbfgs, make_head=make_head), "wd", args.wd_grid
    return fit_lars, "lr", [base_lr * factor for factor in args.lr_grid]


# ---- The run ----------------------------------------------------------------------------------
def main(args):
    if args.compare:
        return compare(args)
    check_flags(args)
    t_start = time.time()
    rank, world, device = distributed.setup_distributed()
    outputs = [os.path.join(args.output_dir, name) for name in OUTPUTS]
    if rank == 0:
        files.check_writable_dir(args.output_dir, "--output-dir")
        files.lock(args.output_dir)
        files.claim_outputs(outputs, args.overwrite, inputs=[args.ckpt])
    run = prepare(args, device, world)
    log = RunLog(outputs[0], rank == 0)
    if rank == 0:
        cli.print_settings("linprobe", settings_lines(args, run))
    before = None if run.model is None else registry.checksum(run.model)
    results, knn_res, best, seconds = probe_features(args, run, rank, device, log.write)
    if before is not None and before != registry.checksum(run.model):
        raise RuntimeError("the frozen backbone's weights changed during probing")   # a bug
    info = {"solver": "none: weighted k-NN", "selection": "none: k and T fixed"}
    top1, top5 = knn_res.get("knn_top1"), knn_res.get("knn_top5")
    if results:
        _, top1, top5, info = results[best]
    res = {"top1": round(top1, 2), "top5": round(top5, 2), "protocol": run.protocol,
           "protocol_reason": run.why, "protocol_vs_paper": PAPER[run.protocol],
           "features": run.features, "depth": best[0], "t": best[1], "noisy_input": best[2],
           "clean_input": args.clean_input, **info, **knn_res, "checkpoint": args.ckpt,
           "dataset": args.dataset, "input_size": run.size, "num_classes": run.num_classes,
           "n_train": run.n_train, "n_val": run.n_val, "epochs": args.epochs,
           "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size, "views": args.views,
           "seed": args.seed, "backbone_unchanged": True, **seconds,     # checked above
           "seconds_total": round(time.time() - t_start, 2)}
    if getattr(run, "selection", None):
        res["setting_selection"] = run.selection
    report(args, res, results, best, rank == 0)
    if world > 1:
        dist.destroy_process_group()
    return res


def prepare(args, device, world):
    """The model, the probe settings and the data sets, every check done -> the run's facts."""
    pixels = args.baseline == "pixels"
    model, cfg = None, {}
    described = "raw pixels (flattened, <= 32x32x3)"
    if not pixels:
        model = features.load_backbone(args, device)
        cfg = model.config
        described = f"{cfg.get('name')} checkpoint ({args.weights_used} weights)"
        if args.random_init:
            described = f"random-init {cfg.get('name')} (active blocks)"
    elif args.ckpt:                             # pixels: a checkpoint only fixes the size
        cfg = registry.load(args.ckpt)["model_config"]
    size, keys = features.probe_keys(args, cfg, pixels, model)
    eval_tf = transforms.build_transform("eval", size)
    centre_ds, crops_ds = None, None
    if args.protocol != "mae" or args.knn or args.select_setting:     # built first: auto counts it
        centre_ds = datasets.build_dataset(args, "train", eval_tf)
    protocol, why = choose_protocol(args, None if centre_ds is None else len(centre_ds))
    if protocol == "mae" or args.views > 1:
        crop_tf = transforms.build_transform("rrc", size, scale=(0.08, 1.0))  # MAE's probe crops
        crops_ds = datasets.build_dataset(args, "train", crop_tf)
    val_ds = datasets.build_dataset(args, "val", eval_tf)
    train_ds = centre_ds if centre_ds is not None else crops_ds   # mae alone: the crops only
    num_classes = datasets.num_classes(train_ds)
    val_classes = datasets.num_classes(val_ds)
    if val_classes != num_classes or args.nb_classes not in (None, num_classes):
        raise UserError(f"class counts do not fit: train has {num_classes}, val {val_classes}, "
                        f"--nb-classes {args.nb_classes}; point --data-path at matching splits")
    want = (cfg.get("in_chans", 3), size, size)
    if tuple(val_ds[0][0].shape) != want:
        raise UserError(f"images come out as {tuple(val_ds[0][0].shape)}, the model takes {want}")
    use_knn = protocol == "knn" or args.knn
    heads = protocol == "cached" or args.select_setting          # a head fitted on cached features
    cli.refuse_ignored(args, get_args_parser().parse_args([]), [
        (not heads or args.solver != "lars", ["lr_grid"], "without a cached LARS head"),
        (not heads or args.solver != "lbfgs", ["wd_grid", "max_iter"],
         "without a cached L-BFGS head"),
        (not heads, ["solver", "holdout", "spread"], f"by --protocol {protocol} (no cached head)"),
        (not use_knn, ["knn_k", "knn_t"], "without k-NN (--knn or --protocol knn)"),
        (not args.select_setting or protocol != "mae", ["select_images"],
         "without --select-setting --protocol mae"),
        (not args.grid, ["grid_depths"], "without --grid"),
        (not args.grid and not args.select_setting, ["grid_ts", "grid_inputs"],
         "without --grid or --select-setting"),
        (protocol != "mae", ["accum_iter"], f"by --protocol {protocol} (no micro-batches)"),
        (cfg.get("family") != "ldae" or pixels, ["clean_input"],
         "off an l-DAE checkpoint (only an l-DAE projects its input)"),
        (args.noisy_input, ["clean_input"], "with --noisy-input")])
    if protocol != "mae" or use_knn:            # every setting's features stored, float32
        images = len(train_ds) * args.views + len(val_ds)
        stored = len(keys) * cfg.get("hidden_size", 3072) * images
        cli.check_memory(4 * stored, f"storing {len(keys)} feature set(s) of {len(train_ds)} "
                         f"images", "probe fewer settings or images, or pass --protocol mae")
    if use_knn and args.knn_k > len(train_ds):
        raise UserError(f"--knn-k {args.knn_k} is more than the {len(train_ds)} train images; "
                        f"pass --knn-k {len(train_ds)} or fewer")
    return argparse.Namespace(model=model, size=size, keys=keys, protocol=protocol, why=why,
                              knn=use_knn, centre_ds=centre_ds, crops_ds=crops_ds, val_ds=val_ds,
                              n_train=len(train_ds), n_val=len(val_ds), num_classes=num_classes,
                              base_lr=lr_sched.scaled_lr(args), world=world, features=described)


def probe_features(args, run, rank, device, log):
    """-> ({key: head result}, k-NN fields, the headline key chosen on held-out train, timings)."""
    t0 = time.time()
    keys = run.keys
    if run.protocol == "mae" and args.select_setting:
        keys = [select_setting(args, run, device, rank, log)]
    featurize = features.make_featurizer(run.model, keys, args)
    if run.protocol == "mae" and not run.knn:   # val only: the train pass is the training
        val_x, val_y = features.extract(featurize, run.val_ds, args, device, rank, run.world, "val")
    else:
        train_x, train_y, val_x, val_y = features.cached_features(
            featurize, run.centre_ds, run.crops_ds, run.val_ds, args, device, rank, run.world)
    seconds = {"seconds_features": round(time.time() - t0, 2)}
    t0 = time.time()
    results = {}
    if run.protocol == "mae":
        results[keys[0]] = probe_mae(featurize, keys[0], val_x[keys[0]], val_y, args, run, device,
                                     rank, log)
    if run.protocol == "cached":
        for key in keys:
            results[key] = probe_cached.probe_cached(
                train_x[key], train_y, val_x[key], val_y, args, run.num_classes, device, log,
                {"depth": key[0], "t": key[1], "noisy": key[2]}, *cached_solver(args, run.base_lr))
    seconds["seconds_head"] = round(time.time() - t0, 2)
    best = max(keys, key=lambda k: results[k][3]["heldout_top1"]) if len(keys) > 1 else keys[0]
    knn_res = {}
    if run.knn:                                 # the headline setting's center-crop features
        t0 = time.time()
        knn_res = knn.probe_knn(train_x[best][0], train_y, val_x[best], val_y, args,
                                run.num_classes, device)
        seconds["seconds_knn"] = round(time.time() - t0, 2)
        log({"depth": best[0], "t": best[1], "noisy": best[2], **knn_res})
    return results, knn_res, best, seconds


def select_setting(args, run, device, rank, log):
    """Table 4 with mae: cached heads on a train subset (not 10 feature sets) choose t and input."""
    order = torch.randperm(len(run.centre_ds), generator=torch.Generator().manual_seed(args.seed))
    subset = Subset(run.centre_ds, order[:args.select_images].tolist())
    featurize = features.make_featurizer(run.model, run.keys, args)
    train_x, train_y = features.extract(featurize, subset, args, device, rank, run.world,
                                        "setting sweep")
    scores = {key: probe_cached.probe_cached(
        train_x[key][None], train_y, None, None, args, run.num_classes, device, log,
        {"depth": key[0], "t": key[1], "noisy": key[2]}, *cached_solver(args, run.base_lr))[3]
        ["heldout_top1"] for key in run.keys}
    best = max(run.keys, key=scores.get)
    run.selection = {"images": len(subset), "heldout_top1": {
        f"t{k[1]}{'_noisy' if k[2] else ''}": v for k, v in scores.items()},
        "chosen": {"t": best[1], "noisy": best[2]}}
    log({"kind": "setting_selection", **run.selection})
    return best


def compare(args):
    """--compare: learned, random-init and pixel features; one pass per row feeds both probes."""
    if args.grid or args.random_init or args.baseline:
        raise UserError("--compare runs the learned, --random-init and --baseline pixels probes "
                        "itself: drop --grid/--random-init/--baseline")
    runs = {}
    for name, overrides in COMPARE_ROWS:
        row = {**vars(args), "compare": False, "knn": True, **overrides,
               "output_dir": os.path.join(args.output_dir, name)}
        runs[name] = main(argparse.Namespace(**row))
    learned = runs["learned"]
    linear = learned["protocol"] != "knn"
    res = {key: learned[key] for key in ("top1", "top5", "protocol", "protocol_reason",
                                         "features", "depth", "t", "knn_k", "knn_t", "solver")}
    for name, run in runs.items():
        prefix = "" if name == "learned" else f"{name}_"
        res.update({prefix + key: run[key] for key in ("top1", "top5", "knn_top1", "knn_top5")})
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{'features':<46}{'linear top-1':>13}{'top-5':>7}{'k-NN top-1':>12}{'top-5':>7}")
        for run in runs.values():
            figures = f"{run['top1']:13.2f}{run['top5']:7.2f}" if linear else f"{'-':>13}{'-':>7}"
            print(f"{run['features'][:45]:<46}{figures}{run['knn_top1']:12.2f}"
                  f"{run['knn_top5']:7.2f}")
        print(json.dumps(res), flush=True)
    return res


# ---- Checks, data, settings and the report ----------------------------------------------------
def choose_protocol(args, n_train):
    """-> (protocol, why): the one place --protocol auto is decided (n_train None: not counted)."""
    if args.protocol != "auto":
        return args.protocol, f"--protocol {args.protocol}"
    if args.grid or args.views > 1:
        return "cached", "auto: --grid and --views need stored features"
    steps = n_train // args.batch_size
    counted = f"auto: {n_train} train images / batch {args.batch_size} = {steps} steps per epoch"
    if steps >= AUTO_MIN_STEPS:
        return "mae", f"{counted} >= {AUTO_MIN_STEPS}"
    return "cached", f"{counted} < {AUTO_MIN_STEPS}; --protocol mae runs the paper's anyway"


def check_flags(args):
    """The flag combinations that cannot run, refused before any work."""
    select = args.grid or args.select_setting
    pixels = args.baseline == "pixels"
    problems = [
        (args.grid and args.protocol in ("mae", "knn") or select and args.protocol == "knn",
         "--grid needs --protocol cached (features are stored once and the heads chosen on "
         "held-out train), --select-setting cached or mae; drop --protocol or pass cached"),
        (args.views > 1 and args.protocol in ("mae", "knn"),
         "--views is for --protocol cached; mae augments every epoch, knn reads the center crop"),
        (pixels and (args.random_init or args.grid),
         "--baseline pixels has no network: drop --random-init/--grid"),
        (not args.ckpt and not pixels, "give the checkpoint to probe: python linprobe.py CKPT ..."),
        (args.warmup_epochs >= args.epochs, "--warmup-epochs must be in [0, --epochs)"),
    ]
    for broken, message in problems:
        if broken:
            raise UserError(message)


def settings_lines(args, run):
    model = "none: raw pixels, flattened (<= 32x32x3 values)"
    if run.model is not None:
        cfg = run.model.config
        params = sum(p.numel() for p in run.model.parameters()) / 1e6
        model = (f"{cfg['name']}: {params:.2f}M params, {run.size} px, {cfg.get('depth')} blocks; "
                 f"{run.features}")
    inputs = "/".join(sorted({"noisy" if key[2] else "clean" for key in run.keys}))
    lbfgs = run.protocol == "cached" and args.solver == "lbfgs"
    head = "nothing trains (no batch, lr, epochs or warmup)"
    if lbfgs:
        head = (f"L-BFGS, full batch, <= {args.max_iter} iterations (no lr, epochs or warmup); "
                f"L2 from {args.wd_grid} chosen on held-out train")
    if run.protocol == "cached" and not lbfgs:
        batch = min(args.batch_size, run.n_train)
        head = (f"LARS, {batch} cached features per step on one device, {run.n_train // batch} "
                f"step(s) per epoch; lr = actual x {args.lr_grid} chosen on held-out train")
    if run.protocol == "mae":
        layout = mae_layout(args, run.world, run.n_train)
        head = (f"LARS, global batch {run.world * layout['accum'] * layout['micro']} = "
                f"{run.world} rank(s) x accum {layout['accum']} x micro-batch {layout['micro']}, "
                f"{layout['steps']} step(s) per epoch, the first of {layout['first_step']} "
                f"micro-batch(es)")
    lines = [f"checkpoint  {args.ckpt or 'none'}", f"model       {model}",
             f"probe       depth {sorted({key[0] for key in run.keys})}, t "
             f"{sorted({key[1] for key in run.keys})}, {inputs} input",
             f"data        {args.dataset}: {run.n_train} train / {run.n_val} val images, "
             f"{run.num_classes} classes",
             f"protocol    {run.protocol} ({run.why})", f"            {PAPER[run.protocol]}",
             f"head        {head}"]
    if run.protocol != "knn" and not lbfgs:
        rule = f"--blr {args.blr:g} x batch {args.batch_size} / 256" if args.lr is None else "--lr"
        lines += [f"lr          base {args.blr:g}, actual {run.base_lr:.4g} ({rule})",
                  f"schedule    {args.epochs} epochs, {args.warmup_epochs} warmup, cosine"]
    if run.knn:
        lines.append(f"k-NN        k {args.knn_k}, T {args.knn_t:g}, cosine of L2-normalised "
                     f"features")
    return lines + [f"output      {args.output_dir}"]


def report(args, res, results, best, main_rank):
    """Adds res["grid"]; the main rank prints the grid, result and JSON lines and saves head.pt."""
    short = {}
    for key, (_, top1, top5, info) in results.items():
        chosen = {name: info[name] for name in ("lr", "wd", "heldout_top1") if name in info}
        short[key] = {"top1": round(top1, 2), "top5": round(top5, 2), **chosen}
    if len(results) > 1:
        res["grid"] = [{"depth": k[0], "t": k[1], "noisy": k[2], **v} for k, v in short.items()]
    if not main_rank:
        return
    if len(results) > 1:                        # DDAE-style table: rows depth, columns t
        levels = sorted({key[1:] for key in results})
        print("depth \\ t " + "".join(f"{f'{t}n' if noisy else t:>8}" for t, noisy in levels))
        for depth in sorted({key[0] for key in results}):
            print(f"{depth:>9} " + "".join(f"{results[(depth, *level)][1]:8.2f}"
                                           for level in levels))
    if results:
        heads = {f"depth{k[0]}_t{k[1]}{'_noisy' if k[2] else ''}": {**r[0], **short[k]}
                 for k, r in results.items()}
        settings = {k: v for k, v in res.items() if k != "grid"}
        files.save_torch({"heads": heads, "settings": settings},
                         os.path.join(args.output_dir, OUTPUTS[1]))
    setting = f"depth {best[0]}, t {best[1]}, {'noisy' if best[2] else 'clean'} input"
    also = ""
    if "knn_top1" in res and res["protocol"] != "knn":
        also = f"  k-NN top-1 {res['knn_top1']:.2f}  top-5 {res['knn_top5']:.2f}"
    print(f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}{also}  ({res['features']}; "
          f"{res['protocol']}; {setting})")
    print(json.dumps(res), flush=True)


def get_args_parser():
    num = cli.bounded
    parser = cli.ArgumentParser(prog="linprobe.py", description="Linear probe (and k-NN) of a "
                                "frozen l-DAE / DiT encoder (RECIPE.md s5)")
    add = parser.add_argument_group("what to probe").add_argument
    add("ckpt", nargs="?", help="checkpoint of pretrain.py (optional with --baseline pixels)")
    add("--weights", choices=("ema", "raw"), default="ema",
        help="the checkpoint's EMA or raw weights (raw when it has no EMA)")
    add("--probe-depth", type=num(int, 1),
        help="block to read (default: depth / 2, the last encoder block)")
    add("--probe-t", type=num(int, 0), help="noise level the network is told "
        "(default: 10, the paper's; a single-level model: the level it was trained at)")
    add("--noisy-input", action="store_true", help="add level-t noise to the input (paper Sec. 5)")
    add("--clean-input", choices=("projected", "image"), default="projected",
        help="an l-DAE's clean input: the image projected onto its d-dim PCA subspace (default: "
             "what it was trained on, measured best) or the raw image")
    add("--random-init", action="store_true", help="baseline: fresh weights, active blocks")
    add("--baseline", choices=("pixels",), help="baseline: probe raw pixels")
    add("--compare", action="store_true",
        help="learned vs --random-init vs --baseline pixels: linear and k-NN, one table")
    add("--grid", action="store_true", help="a head per (depth, t) pair (DDAE protocol)")
    add("--grid-depths", type=cli.number_list(int, 1),
        help="e.g. 6,9,12 (default: depth/4 .. 3 depth/4)")
    add("--grid-ts", type=cli.number_list(int, 0), default=[0, 10, 20, 40, 80],
        help="t values of --grid and --select-setting (RECIPE s5's)")
    add("--grid-inputs", choices=("clean", "noisy", "both"),
        help="inputs of --grid / --select-setting (default: clean; both with --select-setting)")
    add("--select-setting", action="store_true", help="the paper's Table 4 probe: the best "
        "(t, clean/noisy input) chosen on held-out train (with --protocol mae: by the cached head "
        "on --select-images of them, then mae at that setting)")
    add("--select-images", type=num(int, 1), default=10000, help="--select-setting --protocol "
        "mae: train images of the setting sweep (a seeded subset)")
    add = parser.add_argument_group("protocol and head").add_argument
    add("--protocol", choices=("auto", "mae", "cached", "knn"), default="auto", help=f"auto: mae "
        f"when the train set gives >= {AUTO_MIN_STEPS} steps per epoch at --batch-size, else "
        f"cached (always cached with --grid/--select-setting/--views); mae: the paper's; cached: "
        f"one feature pass, head solved or on mae's schedule; knn: weighted k-NN, nothing trained")
    add("--epochs", type=num(int, 1), default=90, help="probe epochs (mae, cached lars)")
    add("--warmup-epochs", type=num(int, 0), default=10, help="linear warmup epochs")
    add("--batch-size", type=num(int, 1), default=16384,
        help="global batch (all ranks and micro-batches)")
    add("--blr", type=num(float, 0), default=0.1, help="lr = blr * batch / 256 (MAE: 6.4 at 16384)")
    add("--lr", type=num(float, 0),
        help="absolute lr (overrides --blr). The paper's text says 6.4e-3: under LARS lr 6.4 "
             "moves a weight matrix by 6.4e-3 of its norm in its first step (RECIPE s5)")
    add("--accum-iter", type=num(int, 1),
        help="mae: micro-batches per step (default: enough for --max-device-batch)")
    add("--solver", choices=("lbfgs", "lars"), default="lbfgs",
        help="cached: lbfgs converges; lars runs mae's LARS schedule")
    add("--wd-grid", type=cli.number_list(float, 0), default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        help="cached lbfgs: L2 values swept")
    add("--lr-grid", type=cli.number_list(float, 0, low_open=True), default=[0.25, 0.5, 1, 2, 4],
        help="cached lars: lr factors swept")
    add("--holdout", type=num(float, 0, 1, low_open=True, high_open=True), default=0.1,
        help="cached: train fraction that does the choosing")
    add("--max-iter", type=num(int, 1), default=500, help="cached lbfgs: iteration cap")
    add("--spread", action="store_true", help="cached: also report val top-1 per grid value")
    add("--views", type=num(int, 1), default=1,
        help="cached: center crop + K-1 random crops per image")
    add("--knn", action="store_true",
        help="also report the k-NN figure (from a center-crop pass; cached: the same one)")
    add("--knn-k", type=num(int, 1), default=20, help="k-NN: neighbours that vote (DINO's 20)")
    add("--knn-t", type=num(float, 0, low_open=True), default=0.07,
        help="k-NN: vote weight exp(cosine / T) (DINO's 0.07)")
    add("--seed", type=cli.SEED, default=0, help="head init, data order, crops, held-out split")
    add("--nb-classes", type=num(int, 1),
        help="the head's expected class count (checked against the data)")
    datasets.add_data_args(parser)
    parser.set_defaults(input_size=None)        # default: the checkpoint model's img_size
    add = parser.add_argument_group("device and output").add_argument
    add("--max-device-batch", type=num(int, 1), default=1024,
        help="images per forward on one device")
    add("--compile", action="store_true", help="torch.compile the feature pass")
    add("--output-dir", default="out/probe",
        help="probe_log.jsonl (a line per epoch or solve) and head.pt")
    add("--overwrite", action="store_true", help="replace a previous probe's files in --output-dir")
    return parser


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
