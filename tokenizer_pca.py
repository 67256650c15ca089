"""Patch-wise PCA tokenizer of l-DAE (RECIPE s2; paper Sec. 4.2 / Table 2 "patch-wise PCA"): the
eigenvectors of the second moment (--center: covariance) of p x p x 3 patches in (p, q, c) order,
D = 3 p^2. The top d span the latent l-DAE noises (d = 32 in the final model); all D weigh its loss.

  python tokenizer_pca.py --dataset synthetic --input-size 32 --patch-size 4 --out /tmp/pca.pt
  python tokenizer_pca.py --dataset imagefolder --data-path /data/imagenet/train --input-size 256 \
      --patch-size 16 --num-images 20000 --patches-per-image 64 --out pca_in1k.pt   # ImageNet
"""
import json
import math
import os
import signal
import time

import torch
import torch.nn as nn

VERSION = 1
LATENT_NORMS = ("none", "global", "whiten")


class PatchPCA(nn.Module):
    """The fitted basis: eigenvector rows (D, D) by descending eigenvalue; d is chosen per call."""

    def __init__(self, components, eigenvalues, mean=None, patch_size=16, channels=3, img_size=256,
                 center=False, scale=1.0, meta=None):
        super().__init__()
        D = patch_size * patch_size * channels
        if components.shape != (D, D):
            raise ValueError(f"components must be ({D}, {D}) for patch {patch_size} x "
                             f"{channels} ch")
        self.register_buffer("components", components.float().clone())
        self.register_buffer("eigenvalues", eigenvalues.float().clone())
        self.register_buffer("mean", torch.zeros(D) if mean is None else mean.float().clone())
        self.patch_size, self.channels = int(patch_size), int(channels)
        self.img_size, self.center, self.scale = int(img_size), bool(center), float(scale)
        self.meta = dict(meta or {})  # fit metadata: primitives only (weights_only loading)

    @property
    def dim(self):
        return self.components.shape[0]

    @classmethod
    def empty(cls, patch_size, channels=3, img_size=256):
        """Identity basis, to build a model whose real basis arrives with load_state_dict."""
        D = patch_size * patch_size * channels
        return cls(torch.eye(D), torch.ones(D), None, patch_size, channels, img_size)

    # -- patch layout: (p, q, c) per patch, the order of DiT's final layer output (contract) ----
    def patchify(self, x):
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p or C != self.channels:
            raise ValueError(f"image {tuple(x.shape)} does not tile into {p} x {p} x "
                             f"{self.channels} patches")
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)                  # (B, L, D)

    def unpatchify(self, t, h=None, w=None):
        B, L, D = t.shape
        p, C = self.patch_size, self.channels
        if h is None:
            h = w = math.isqrt(L)
        if w is None:
            w = L // h
        if h * w != L or D != p * p * C:
            raise ValueError(f"cannot unpatchify {tuple(t.shape)} into {h} x {w} patches of "
                             f"{p}x{p}x{C}")
        t = t.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)            # (B, C, h, p, w, q)
        return t.reshape(B, C, h * p, w * p)

    def encode(self, x, d=None, gain=None):
        """image (B, C, H, W) -> latents (B, L, d) = gain * (patches - mean) V_d^T."""
        V = self.components[:d].to(x.dtype)                                   # (d, D); None: all
        gain = self.scale if gain is None else gain
        return ((self.patchify(x) - self.mean.to(x.dtype)) @ V.T) * gain

    def decode(self, z, h=None, w=None, gain=None):
        """latents (B, L, d) -> image: patches = (z / gain) V_d + mean (inverse PCA, RECIPE s3)."""
        V = self.components[: z.shape[-1]].to(z.dtype)
        gain = self.scale if gain is None else gain
        return self.unpatchify((z / gain) @ V + self.mean.to(z.dtype), h, w)

    def latent_gain(self, d, norm="none", scale=None):
        """(d,) latent gains x scale (RECIPE s2): none 1, global 1/rms of top d, whiten 1/std."""
        scale = self.scale if scale is None else float(scale)
        # floored at 1e-12 of the largest (grayscale has zero-variance directions); no host sync
        ev = torch.maximum(self.eigenvalues[:d].double(), 1e-12 * self.eigenvalues[:1].double())
        if norm == "none":
            gain = torch.ones_like(ev)
        elif norm == "global":
            gain = ev.mean().rsqrt().expand(d)
        elif norm == "whiten":
            gain = ev.rsqrt()
        else:
            raise ValueError(f"latent norm must be one of {', '.join(LATENT_NORMS)}, not {norm!r}")
        return (scale * gain).float()

    def project(self, x, d):
        """image -> its component in the top-d subspace (what l-DAE's noisy input is built on)."""
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        return self.decode(self.encode(x, d), h, w)

    def coords(self, patches):
        """(B, L, D) -> coordinates in the full basis (no mean, no scale): the loss weighs them."""
        return patches @ self.components.to(patches.dtype).T

    def explained(self, d):
        """Fraction of the fit's energy (or variance if centred) held by the top d components."""
        ev = self.eigenvalues.double().clamp_min(0)
        return float(ev[:d].sum() / ev.sum())

    # -- persistence: plain dicts of tensors + primitives --------------------------------------
    def get_extra_state(self):
        # in the owning model's state_dict too: load_state_dict restores these, not just buffers
        return {"patch_size": self.patch_size, "channels": self.channels, "img_size": self.img_size,
                "center": self.center, "scale": self.scale, "meta": dict(self.meta)}

    def set_extra_state(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def to_dict(self):
        return {"version": VERSION, "components": self.components.detach().cpu(),
                "eigenvalues": self.eigenvalues.detach().cpu(), "mean": self.mean.detach().cpu(),
                **self.get_extra_state()}

    @classmethod
    def from_dict(cls, d):
        """The basis of to_dict's dict; ValueError saying what is wrong with any other."""
        tensors = ("components", "eigenvalues")
        if not isinstance(d, dict) or not all(isinstance(d.get(k), torch.Tensor) for k in tensors):
            raise ValueError("not a PCA basis: no 'components' and 'eigenvalues' tensors")
        p, C = d.get("patch_size"), d.get("channels", 3)
        D = C * p ** 2 if isinstance(p, int) and isinstance(C, int) else None
        mean = d.get("mean")
        shapes = [tuple(d["components"].shape), tuple(d["eigenvalues"].shape)]
        if D is None or shapes != [(D, D), (D,)] or mean is not None and mean.shape != (D,):
            raise ValueError(f"components {shapes[0]} and eigenvalues {shapes[1]} do not fit "
                             f"patch_size {p} x channels {C}")
        if not all(torch.isfinite(d[k]).all() for k in tensors):
            raise ValueError("its components or eigenvalues hold NaN or infinity")
        return cls(d["components"], d["eigenvalues"], mean, p, C, d.get("img_size", 256),
                   d.get("center", False), d.get("scale", 1.0), d.get("meta"))

    @classmethod
    def load(cls, path, map_location="cpu"):
        return cls.from_dict(torch.load(path, map_location=map_location, weights_only=True))


def _leave_ctrl_c_to_main(worker_id):
    """A DataLoader worker ignores Ctrl-C: the main process stops the fit (one line, exit 130)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class GramAccumulator:
    """Streaming sum(x) and X^T X in float64 for rows x of dim D."""

    def __init__(self, D, device="cpu", gemm_dtype=None, block=192):
        self.device = torch.device(device)
        # float32 GEMM on CPU: 2x faster, error ~1e-6 << the eigen-gaps; float64 on GPU (not TF32)
        default_dtype = torch.float64 if self.device.type == "cuda" else torch.float32
        self.gemm_dtype = gemm_dtype or default_dtype
        self.gram = torch.zeros(D, D, dtype=torch.float64, device=self.device)
        self.s = torch.zeros(D, dtype=torch.float64, device=self.device)
        self.n, self.block = 0, block

    def add(self, X):  # X (N, D)
        X = X.to(self.device, self.gemm_dtype, non_blocking=True)
        self.s += X.sum(0, dtype=torch.float64)
        for i in range(0, X.shape[1], self.block):  # symmetric: upper blocks only (-40% flops)
            self.gram[i:i + self.block, i:] += X[:, i:i + self.block].T @ X[:, i:]
        self.n += X.shape[0]

    def moments(self):
        """-> (mean (D,), second moment E[x x^T] (D, D)), float64."""
        upper = torch.triu(self.gram)
        gram = upper + torch.triu(upper, 1).T
        return self.s / self.n, gram / self.n


def eig_basis(second_moment, mean, center):
    """Eigen-decomposition -> (components rows descending, eigenvalues), float64."""
    C = second_moment - torch.outer(mean, mean) if center else second_moment
    evals, evecs = torch.linalg.eigh(C)           # ascending, columns are eigenvectors
    evals, evecs = evals.flip(0), evecs.flip(1).T  # descending, rows are eigenvectors
    idx = evecs.abs().argmax(1)                    # each largest |entry| positive: reproducible
    evecs = evecs * torch.sign(evecs.gather(1, idx[:, None]))
    return evecs, evals


def _image_batches(data, num_images, batch_size, num_workers, seed):
    """Image batches (B, C, H, W) of a map-style dataset (sampled), a tensor or an iterable."""
    if isinstance(data, torch.Tensor):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        data = data[order[:num_images]].split(batch_size)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        generator = torch.Generator().manual_seed(seed)          # also seeds the workers' RNGs
        sample = torch.randperm(len(data), generator=generator)[:num_images].tolist()
        data = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, sample), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, generator=generator, worker_init_fn=_leave_ctrl_c_to_main)
    seen = 0
    for batch in data:
        batch = batch[0] if isinstance(batch, (list, tuple)) else batch   # (images, labels)
        if num_images is not None:
            if seen >= num_images:
                break
            batch = batch[: num_images - seen]
        seen += len(batch)
        yield batch


def fit_pca(dataset, patch_size, num_images=None, patches_per_image=0, center=False, scale=1.0,
            seed=0, device=None, batch_size=64, num_workers=0, progress=True, gemm_dtype=None,
            meta=None):
    """A PatchPCA fitted on num_images random images (RECIPE s2), all or patches_per_image of their
    patches, deterministic given seed; dataset: (image, label) pairs, an image tensor or batches."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if num_images is None or (total is not None and num_images > total):
        num_images = total
    patch_generator = torch.Generator().manual_seed(seed + 1)   # independent of the image sample
    gram, start, images_seen, shape = None, time.time(), 0, None
    try:      # tqdm is optional: this file and ldae.py copy into a project with torch alone
        from tqdm import tqdm
        bar = tqdm(total=num_images, unit="img", desc="pca fit", disable=not progress)
    except ImportError:
        bar = None
    patcher = PatchPCA.empty(patch_size, 3)
    for x in _image_batches(dataset, num_images, batch_size, num_workers, seed):
        patcher.channels, shape = x.shape[1], tuple(x.shape[1:])
        patches = patcher.patchify(x)                                      # (B, L, D)
        if patches_per_image and patches_per_image < patches.shape[1]:
            scores = torch.rand(patches.shape[:2], generator=patch_generator)
            keep = scores.argsort(1)[:, :patches_per_image]                 # (B, k)
            patches = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[2]))
        if gram is None:
            gram = GramAccumulator(patches.shape[2], device, gemm_dtype)
        gram.add(patches.reshape(-1, patches.shape[2]))
        images_seen += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if gram is None:
        raise ValueError("fit_pca got no images")
    mean, second_moment = gram.moments()
    components, eigenvalues = eig_basis(second_moment, mean, center)
    info = {"num_images": images_seen, "num_patches": gram.n,
            "patches_per_image": int(patches_per_image), "seconds": round(time.time() - start, 3),
            "seed": int(seed), "device": str(device), **(meta or {})}
    return PatchPCA(components.cpu(), eigenvalues.cpu(), mean.cpu() if center else None,
                    patch_size, shape[0], shape[-1], center, scale, info)


# ---- CLI: fit, save, report (explained energy, coordinate scales) and write PNGs beside --out
def get_args_parser():
    from util import cli, datasets
    num = cli.bounded
    p = cli.ArgumentParser(prog="tokenizer_pca.py",
                           description="Fit the patch-wise PCA tokenizer (RECIPE.md s2)")
    fit = p.add_argument_group("the fit")
    fit.add_argument("--out", default="pca.pt", help="basis file; PNGs are written next to it")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing --out and PNGs")
    fit.add_argument("--patch-size", type=num(int, 1), default=16, help="patch side p: D = 3 p^2")
    fit.add_argument("--num-images", type=num(int, 1), default=10000,
                     help="random sample of the train split")
    fit.add_argument("--patches-per-image", type=num(int, 0), default=0,
                     help="0 = all patches, k = k random ones")
    # choices the paper leaves open (RECIPE s2): uncentred (the top direction is the patch's
    # mean colour) and latent scale 1, so that sigma in [0, sqrt 2] is strong noise
    fit.add_argument("--center", action="store_true", help="subtract the mean patch (default: no)")
    fit.add_argument("--latent-scale", type=num(float, 0, low_open=True), default=1.0,
                     help="z = scale * V_d (x - mean)")
    fit.add_argument("--seed", type=cli.SEED, default=0,
                     help="draws the image sample and the patch sample")
    fit.add_argument("--batch-size", type=num(int, 1), default=64,
                     help="images per batch of the fit")
    fit.add_argument("--device", type=cli.device,
                     help="where X^T X accumulates (default: cuda if available, else cpu)")
    datasets.add_data_args(p)
    return p


def main(args):
    from util import cli, datasets, files, transforms
    if args.input_size % args.patch_size:
        raise cli.UserError(f"--input-size {args.input_size} is not a multiple of --patch-size "
                            f"{args.patch_size}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out} is a folder; pass a file name such as "
                            f"{args.out}/pca.pt")
    if not os.path.isdir(out_dir):
        raise cli.UserError(f"output folder {out_dir} does not exist; create it (mkdir -p "
                            f"{out_dir}) or pick another --out")
    files.check_writable_dir(out_dir, "the folder of --out")
    D = 3 * args.patch_size ** 2                # X^T X and its eigenvectors, float64: 4 D x D
    cli.check_memory(32 * D ** 2, f"--patch-size {args.patch_size} (D = {D})",
                     "pass a smaller --patch-size")
    files.claim_outputs([args.out, *png_paths(args.out)], args.overwrite, inputs=[args.data_path])
    # The tokenizer sees the images the ablation models see: DiT center crop (RECIPE s2, s6).
    center = transforms.build_transform("center", args.input_size)
    ds = datasets.build_dataset(args, "train", center)
    cli.print_settings("pca", [
        f"data        {min(args.num_images, len(ds))} of {len(ds)} images at {args.input_size} px",
        f"patches     {args.patch_size} px (D = {D}), "
        f"{args.patches_per_image or 'all'} per image, center {args.center}",
        f"fit         batch {args.batch_size}, seed {args.seed}, device {args.device or 'auto'}, "
        f"latent scale {args.latent_scale:g}", f"output      {args.out}"])
    start = time.time()
    pca = fit_pca(ds, args.patch_size, args.num_images, args.patches_per_image, args.center,
                  args.latent_scale, args.seed, args.device, args.batch_size, args.num_workers,
                  meta={"dataset": args.dataset, "data_path": args.data_path or ""})
    seconds = time.time() - start
    pca.meta["seconds"] = round(seconds, 3)
    files.save_torch(pca.to_dict(), args.out)
    print(f"fitted on {pca.meta['num_images']} images, {pca.meta['num_patches']} patches "
          f"(D = {pca.dim}) in {seconds:.1f} s ({pca.meta['num_patches'] / seconds:,.0f} "
          f"patches/s end to end, incl. decoding)")
    dims = [d for d in (8, 16, 32, 64, 128) if d <= pca.dim]          # Table 2's d values
    explained = {d: round(100 * pca.explained(d), 3) for d in dims}
    print(f"explained {'variance' if pca.center else 'energy (uncentred)'}, cumulative %: "
          + ", ".join(f"d={d}: {percent:.2f}" for d, percent in explained.items()))
    std = pca.eigenvalues.clamp_min(0).sqrt()
    print("coordinate std (latent scale 1) at 1,2,4,..: "
          + ", ".join(f"{std[i - 1]:.3g}" for i in (1, 2, 4, 8, 16, 32, 64, 128) if i <= pca.dim))
    components_png, recon_png = write_pngs(pca, ds, args.out, dims)
    print(f"wrote {args.out}\ncomponents: {components_png}\nreconstructions (rows: original, "
          f"d = {', '.join(map(str, dims))}): {recon_png}")
    summary = {"path": args.out, "images": pca.meta["num_images"],
               "patches": pca.meta["num_patches"], "seconds": round(seconds, 3),
               "explained_pct": explained, "components_png": components_png, "recon_png": recon_png}
    print(json.dumps(summary))
    return summary


def png_paths(out):
    """The two pictures beside the basis file -> (components, reconstructions)."""
    stem = os.path.splitext(out)[0]
    return stem + "_components.png", stem + "_recon.png"


def write_pngs(pca, ds, out, dims):
    """Beside `out`: the top 64 components as p x p tiles; 8 images, projected at each d in dims."""
    import torchvision

    from util import files
    p, C = pca.patch_size, pca.channels
    tiles = pca.components[:64].reshape(-1, p, p, C).permute(0, 3, 1, 2)   # rows are (p, q, c)
    low, high = tiles.amin((1, 2, 3), keepdim=True), tiles.amax((1, 2, 3), keepdim=True)
    tiles = (tiles - low) / (high - low).clamp_min(1e-12)
    tiles = nn.functional.interpolate(tiles, scale_factor=max(1, 32 // p), mode="nearest")
    x = torch.stack([ds[i][0] for i in range(min(8, len(ds)))])
    recon = torch.cat([x] + [pca.project(x, d) for d in dims]).clamp(-1, 1) * 0.5 + 0.5
    upscale = max(1, 128 // x.shape[-1])                    # small images: a readable grid
    recon = nn.functional.interpolate(recon, scale_factor=upscale, mode="nearest")
    components_png, recon_png = png_paths(out)
    files.atomic_write(components_png, lambda tmp: torchvision.utils.save_image(
        tiles, tmp, format="png", nrow=8, padding=2, pad_value=0.5))
    files.atomic_write(recon_png, lambda tmp: torchvision.utils.save_image(
        recon, tmp, format="png", nrow=len(x), padding=2, pad_value=1.0))
    return components_png, recon_png


if __name__ == "__main__":
    from util import cli
    cli.run_cli(main, get_args_parser())
