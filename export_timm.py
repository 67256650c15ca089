"""Export an l-DAE encoder as a plain timm VisionTransformer: the same function as the checkpoint's
forward_features (last encoder block, t = 10, clean input, average pooling; RECIPE s5), exactly.

  python export_timm.py out/tiny/checkpoint.pt --out out/tiny/vit_timm.pt
  python export_timm.py out/vit_b/checkpoint.pt --out vit_b_ldae_timm.pt --weights ema
  python export_timm.py CKPT --out FILE --probe-t 20 --probe-depth 10    # another (t, block)

FILE is {"state_dict", "timm_kwargs", "source"}: VisionTransformer(**timm_kwargs) loads state_dict
strictly (timm >= 1.0.11; this script needs only torch), checked against forward_features first.
The last JSON line gives train_py_flags, the shape as flags of timm's train.py (docs/USAGE.md).
"""
import json
import os

import torch
import torch.nn.functional as F

import ldae
from util import cli, files, registry
from util.cli import UserError


def get_args_parser():
    p = cli.ArgumentParser(prog="export_timm.py",
                           description="Export an l-DAE encoder as a timm VisionTransformer")
    p.add_argument("ckpt", help="checkpoint.pt written by pretrain.py (an l-DAE model)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (what the paper evaluates) or the raw ones")
    p.add_argument("--probe-t", type=cli.bounded(int, 0), help="noise level folded "
                   "in (default: the model's probe_t: 10, or a single-level model's own level)")
    p.add_argument("--probe-depth", type=cli.bounded(int, 1),
                   help="blocks exported (default: the encoder, half the blocks)")
    p.add_argument("--check-images", type=cli.bounded(int, 0), default=2,
                   help="random images for the self-check before writing (0 = skip)")
    return p


def fold_patch_embed(model):
    """Conv weight and bias of conv(V_d^T V_d (x - m) + m), the clean probe input (ldae.add_noise
    at sigma 0: the latent gain multiplies, then divides), in float64 then float32."""
    V = model.pca.components[:model.d].double()                         # (d, D)
    proj = V.T @ V                                                      # (D, D), symmetric
    conv = model.x_embedder.proj
    out, C, p, _ = conv.weight.shape
    # PatchPCA flattens a patch in (row, column, channel) order; the conv weight is (C, p, p)
    W = conv.weight.double().permute(0, 2, 3, 1).reshape(out, -1)       # (out, D) in PCA order
    mean = model.pca.mean.double()
    weight = (W @ proj).reshape(out, p, p, C).permute(0, 3, 1, 2)
    bias = conv.bias.double() + W @ (mean - proj @ mean)
    return weight.float().contiguous(), bias.float()


def timm_kwargs(cfg, depth):
    """VisionTransformer(**kwargs) with exactly the l-DAE encoder's shape; primitives only."""
    return dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
                num_classes=0, global_pool="avg", embed_dim=cfg["hidden_size"], depth=depth,
                num_heads=cfg["num_heads"], mlp_ratio=float(cfg["mlp_ratio"]), qkv_bias=True,
                init_values=1.0, class_token=False, final_norm=False, fc_norm=False,
                act_layer="gelu_tanh")


def train_flags(kw):
    """The export's shape as flags of timm's train.py: global_pool, num_classes and in_chans are
    its own flags; --model-kwargs has every dimension (img_size: else pos_embed goes to 224 px)."""
    own = ("global_pool", "num_classes", "in_chans")
    model_kwargs = " ".join(f"{k}={v}" for k, v in kw.items() if k not in own)
    return f"--gp {kw['global_pool']} --in-chans {kw['in_chans']} --model-kwargs {model_kwargs}"


@torch.no_grad()
def export_model(model, t, depth):
    """-> (state_dict with timm's names, timm_kwargs) for blocks 1..depth at noise level t."""
    weight, bias = fold_patch_embed(model)
    sd = {"patch_embed.proj.weight": weight, "patch_embed.proj.bias": bias,
          "pos_embed": model.pos_embed.detach().clone()}
    c = model.t_embedder(torch.tensor([t]))                             # (1, cond_dim)
    for i, block in enumerate(model.blocks[:depth]):
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c)[0].chunk(6)
        pre = f"blocks.{i}."
        # x * (1 + scale) + shift after an affine-free LayerNorm is a LayerNorm with that affine
        sd.update({pre + "norm1.weight": 1 + scale1, pre + "norm1.bias": shift1,
                   pre + "ls1.gamma": gate1, pre + "norm2.weight": 1 + scale2,
                   pre + "norm2.bias": shift2, pre + "ls2.gamma": gate2})
        # attn.qkv/attn.proj and mlp.fc1/mlp.fc2 already carry timm's names and layout
        for part in ("attn", "mlp"):
            for name, tensor in getattr(block, part).state_dict().items():
                sd[f"{pre}{part}.{name}"] = tensor
    sd = {k: v.detach().float().contiguous().clone() for k, v in sd.items()}
    return sd, timm_kwargs(model.config, depth)


@torch.no_grad()
def self_check(model, sd, kw, t, depth, n):
    """-> (max |diff|, feature scale) of timm's layout on the export (pure torch) and the model."""
    S, width = kw["img_size"], kw["embed_dim"]
    images = torch.rand(n, kw["in_chans"], S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=kw["patch_size"])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]                  # (n, L, D)
    attn = ldae.Attention(width, kw["num_heads"])
    mlp = ldae.Mlp(width, sd["blocks.0.mlp.fc1.weight"].shape[0])

    def norm(h, which):
        return F.layer_norm(h, (width,), sd[which + ".weight"], sd[which + ".bias"], eps=1e-6)
    for i in range(kw["depth"]):              # timm's pre-norm Block with LayerScale
        pre = f"blocks.{i}."
        for name, module in (("attn", attn), ("mlp", mlp)):
            module.load_state_dict({k: sd[f"{pre}{name}.{k}"] for k in module.state_dict()})
        x = x + sd[pre + "ls1.gamma"] * attn(norm(x, pre + "norm1"))
        x = x + sd[pre + "ls2.gamma"] * mlp(norm(x, pre + "norm2"))
    want = model.forward_features(images, t=t, depth=depth)
    return (x.mean(dim=1) - want).abs().max().item(), want.abs().max().item()


def main(args):
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"output folder {out_dir} does not exist; create it or pick another --out")
    files.claim_outputs([args.out], args.overwrite, inputs=[args.ckpt])
    ckpt = registry.load(args.ckpt)
    cfg = ckpt["model_config"]
    if cfg.get("family", "ldae") != "ldae":
        raise UserError(f"{args.ckpt} holds a {cfg.get('family')} model ({cfg.get('name')}); "
                        "only l-DAE checkpoints export: a DiT-baseline's input is a latent grid, "
                        "not an image")
    depth = cfg["depth"] // 2 if args.probe_depth is None else args.probe_depth
    if not 1 <= depth <= cfg["depth"]:
        raise UserError(f"--probe-depth must be in 1..{cfg['depth']} (the blocks of {cfg['name']})")
    if args.probe_t is not None and not 0 <= args.probe_t < cfg["num_steps"]:
        raise UserError(f"--probe-t must be in 0..{cfg['num_steps'] - 1}, got {args.probe_t}")
    model = registry.model_from_checkpoint(ckpt, args.weights, "cpu")
    t = model.probe_t if args.probe_t is None else args.probe_t
    weights = args.weights if ckpt.get("ema") is not None else "raw"
    source = {"checkpoint": os.path.abspath(args.ckpt), "step": int(ckpt["step"]),
              "model": cfg["name"], "t": t, "depth": depth, "weights": weights,
              "latent_dim": model.d, "patch_dim": model.pca.dim, "latent_norm": model.latent_norm,
              "pca_center": model.pca.center}
    print(f"[export] {cfg['name']} step {source['step']} ({weights} weights): blocks 1..{depth} of "
          f"{cfg['depth']}, t = {t}, clean input = PCA projection d = {model.d} of {model.pca.dim} "
          f"(centred: {model.pca.center}), {cfg['img_size']} px -> {args.out}", flush=True)
    sd, kw = export_model(model, t, depth)
    res = {"out": args.out, "timm_kwargs": kw, "train_py_flags": train_flags(kw), "source": source,
           "self_check_max_abs_diff": None}
    if args.check_images:
        diff, scale = self_check(model, sd, kw, t, depth, args.check_images)
        res["self_check_max_abs_diff"] = diff
        print(f"[export] self-check on {args.check_images} random images: max |diff| {diff:.2e} "
              f"(features up to {scale:.3g})", flush=True)
        if not diff <= 1e-4 * max(1.0, scale):
            raise RuntimeError(f"export self-check failed: max |diff| {diff:.3g}; nothing written")
    files.save_torch({"state_dict": sd, "timm_kwargs": kw, "source": source}, args.out)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
