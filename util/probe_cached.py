"""linprobe.py --protocol cached: one feature pass, its head's one setting chosen on train."""
import torch
import torch.nn.functional as F

from util import cli


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
              tag=None, *, make_head):
    """make_head's Linear by full-batch L-BFGS, L2 wd/2 ||W||^2: convex, only wd decides; BN keeps
    stats (0, 1), the identity on whitened inputs -> (head, top1 %, top5 %) on eval_x."""
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
    """-> mean (D,), P (D, r) of TRAIN: (x - mean) @ P standardised (as BN) or whitened, which on
    features of effective rank ~1.1 cut L-BFGS from > 2000 iterations to ~300 (measured)."""
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
    keep = eigenvalues > 1e-8 * eigenvalues.max()          # grayscale's repeated channels: 0
    return mean.float(), (eigenvectors[:, keep] / eigenvalues[keep].sqrt()).float()


def probe_cached(train_x, train_y, val_x, val_y, args, num_classes, device, log, tag, solve,
                 name, grid):
    """Normalise by TRAIN statistics (whitened for L-BFGS, standardised for LARS as `mae`), choose
    `name` in `grid` on held-out center crops, refit, score val -> (state, top1 %, top5 %, info)."""
    n_views, n, dim = train_x.shape
    lbfgs = name == "wd"
    mean, projection = feature_map(train_x.reshape(n_views * n, dim), whiten=lbfgs)
    train_x = (train_x - mean) @ projection
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_held = max(1, round(n * args.holdout))
    held_out, kept = order[:n_held], order[n_held:]
    heldout_top1 = {}
    for value in cli.progress(iterable=grid, desc=f"{name} sweep {tag}", leave=False):
        heldout_top1[value] = solve(train_x[:, kept], train_y[kept], train_x[0, held_out],
                                    train_y[held_out], value, args, num_classes, device,
                                    args.seed)[1]
    best = max(grid, key=heldout_top1.get)                             # ties: the first (smaller)
    if val_x is None:                           # a selection alone: no refit, nothing scored
        return None, None, None, {"heldout_top1": round(heldout_top1[best], 2)}
    val_x = (val_x - mean) @ projection
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
