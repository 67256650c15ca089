"""CPU speed check (not collected by pytest): one l-DAE training step of --model (vit_b)
vs one step of a plain ViT of the same depth, width, heads and tokens (torchvision's
VisionTransformer, + its class token, MSE on its output), both through util/engine.Engine with the
same settings (fp32, AdamW, EMA), so the ratio isolates what l-DAE adds: adaLN conditioning, the
PCA projections of the input and the loss, and the per-token output head. Target: <= 1.15.

    python tools/bench_vit_step.py                     # vit_b, 256 px, batch 2, 4 interleaved reps
    python tools/bench_vit_step.py --img 128 --reps 6  # quicker
Prints one JSON line: per-step seconds (median of the reps) and the ratio.
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain  # noqa: E402
from util import cli, registry  # noqa: E402
from util.engine import Engine  # noqa: E402


class PlainViT(nn.Module):
    def __init__(self, cfg, img):
        super().__init__()
        D = cfg["hidden_size"]
        mlp_dim = int(D * cfg["mlp_ratio"])
        self.vit = torchvision.models.VisionTransformer(
            img, cfg["patch_size"], cfg["depth"], cfg["num_heads"], D, mlp_dim, num_classes=D)

    def loss(self, x, y=None):
        return self.vit(x).float().square().mean()


def get_args_parser():
    p = cli.ArgumentParser(prog="tools/bench_vit_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b", help="a registry l-DAE")
    p.add_argument("--img", type=cli.bounded(int, 1, 4096), default=256, help="image side")
    p.add_argument("--batch", type=cli.bounded(int, 1), default=2, help="images per step")
    p.add_argument("--reps", type=cli.bounded(int, 1), default=4, help="timed steps per model")
    return p


def main(a):
    args = pretrain.get_args_parser().parse_args(["--model", a.model, "--batch-size", str(a.batch)])
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    ours = registry.build_model(a.model, img_size=a.img)
    engines = {"ldae": Engine(ours, args, 0, 1, cpu),
               "plain_vit": Engine(PlainViT(ours.config, a.img), args, 0, 1, cpu)}
    x, y = torch.rand(a.batch, 3, a.img, a.img) * 2 - 1, torch.zeros(a.batch, dtype=torch.long)
    times = {k: [] for k in engines}
    for rep in range(a.reps + 1):                 # interleaved, so load changes hit both alike
        for k, e in engines.items():
            t0 = time.perf_counter()
            e.step([(x, y)], rep, 1e-4)
            if rep:                               # rep 0 is warmup
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ldae_params = sum(q.numel() for q in ours.parameters())
    plain_vit_params = sum(q.numel() for q in engines["plain_vit"].model.parameters())
    res = {"model": a.model, "img": a.img, "batch": a.batch, "reps": a.reps,
           "threads": torch.get_num_threads(),
           "ldae_step_s": round(med["ldae"], 3), "plain_vit_step_s": round(med["plain_vit"], 3),
           "ratio": round(med["ldae"] / med["plain_vit"], 3),
           "ldae_params_m": round(ldae_params / 1e6, 2),
           "plain_vit_params_m": round(plain_vit_params / 1e6, 2)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
