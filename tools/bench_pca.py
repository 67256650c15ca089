"""CPU/GPU speed check of the PCA fit (not collected by pytest): the streamed X^T X accumulation
plus eigh of tokenizer_pca.py against numpy's SVD on the same random patches (the fit must be
bound by image decoding, not by the linear algebra).

    python tools/bench_pca.py                      # 1M x 768 patches (ViT-B/16's D)
    python tools/bench_pca.py --patches 200000     # quicker
Prints the two timings and one JSON line.
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer_pca  # noqa: E402
from util import cli  # noqa: E402


def benchmark(n=1_000_000, D=768, device=None, batch=16384, numpy_rows=100_000):
    """Accumulation alone vs numpy on the same random data (the fit must be decode-bound).

    numpy's SVD of all 1M x 768 rows needs ~16 GB (U plus LAPACK workspace), so it runs on the
    first `numpy_rows` rows and its time is scaled linearly to n (SVD of a tall N x D matrix costs
    O(N D^2)); both figures are printed. The eigenvalues of that sub-sample are compared too.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    X = torch.randn(n, D, generator=torch.Generator().manual_seed(0))      # (n, D) float32
    accumulator = tokenizer_pca.GramAccumulator(D, device)
    accumulator.add(X[:batch])  # warm-up (BLAS threads, CUDA context), then start over
    accumulator = tokenizer_pca.GramAccumulator(D, device)
    t0 = time.time()
    for chunk in X.split(batch):
        accumulator.add(chunk)
    mean, M = accumulator.moments()
    if accumulator.device.type == "cuda":
        torch.cuda.synchronize()
    t_acc = time.time() - t0
    t1 = time.time()
    tokenizer_pca.eig_basis(M, mean, False)
    t_eig = time.time() - t1
    rows = min(n, numpy_rows)
    Xn = X[:rows].numpy()
    t2 = time.time()
    sv = np.linalg.svd(Xn, full_matrices=False, compute_uv=True)[1]      # the plain approach
    t_np = time.time() - t2
    t_np_n = t_np * n / rows
    sub = tokenizer_pca.GramAccumulator(D, "cpu", torch.float64)
    sub.add(X[:rows])
    ev_sub = tokenizer_pca.eig_basis(sub.moments()[1], None, False)[1].numpy()
    rel = float(np.abs(ev_sub - sv.astype(np.float64) ** 2 / rows).max() / ev_sub.max())
    res = {"patches": n, "dim": D, "device": str(accumulator.device),
           "gemm_dtype": str(accumulator.gemm_dtype),
           "accumulate_s": round(t_acc, 3), "accumulate_patches_per_s": round(n / t_acc),
           "eigh_s": round(t_eig, 3), "numpy_svd_rows": rows, "numpy_svd_s": round(t_np, 3),
           "numpy_svd_s_scaled_to_n": round(t_np_n, 2),
           "speedup_vs_numpy_svd": round(t_np_n / (t_acc + t_eig), 2),
           "max_rel_eigenvalue_diff": rel}
    print(f"accumulate {n:,} x {D}: {t_acc:.2f} s ({n / t_acc:,.0f} patches/s) on "
          f"{accumulator.device}, + eigh {t_eig:.2f} s")
    print(f"numpy SVD of {rows:,} x {D}: {t_np:.2f} s -> {t_np_n:.1f} s scaled to {n:,} rows; "
          f"ratio {res['speedup_vs_numpy_svd']}x; eigenvalues agree to {rel:.1e} (relative)")
    return res


def get_args_parser():
    parser = cli.ArgumentParser(prog="tools/bench_pca.py", description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=cli.bounded(int, 1), default=1_000_000,
                        help="rows of the matrix")
    parser.add_argument("--dim", type=cli.bounded(int, 1), default=768,
                        help="D = 3 p^2 (768: 16 px patches)")
    parser.add_argument("--device", type=cli.device, default=None,
                        help="default: cuda if available, else cpu")
    return parser


def main(args):
    res = benchmark(args.patches, args.dim, args.device)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())
