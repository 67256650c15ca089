"""DINO's weighted k-NN (Caron et al. 2021, after Wu et al. 2018): nothing trains or is chosen."""
import torch
import torch.nn.functional as F

# entries of one val chunk's similarity matrix: 1 GiB of float32, ~200 val images x ImageNet train
KNN_CHUNK_ENTRIES = 2**28


def nearest(sim, k):
    """Row-wise top-k of sim (b, N) -> (values, indices); a tie at k goes to the lower index."""
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
    """(M, C) class scores: a val image's k most similar train images vote exp(cosine / T) each."""
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
