"""The training step's speed: pretrain.py's real step (the same Engine: AdamW, EMA, precision,
DDP, --compile) on random data, timed -> img/s, training FLOPs per image, TFLOP/s, MFU and peak
memory, printed as one JSON line. Takes pretrain.py's model and training flags.

  python tools/bench_train.py --model vit_b --steps 20 --batch-size 256 --compile
  torchrun --nproc_per_node=8 tools/bench_train.py --model vit_l --steps 20 --batch-size 1024
  OMP_NUM_THREADS=1 python tools/bench_train.py --model dit_l_2 --steps 3 --batch-size 4
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain  # noqa: E402
from util import cli, distributed, registry  # noqa: E402
from util.engine import Engine  # noqa: E402

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
               "L40S": 362.0}                      # dense bf16 per GPU, for the MFU


def train_flops_per_image(model):
    """Analytic training FLOPs per image of an l-DAE or DiT model, sizes read off its modules:
    3 x the forward (backward = 2 x forward) of the token stack, 2 FLOPs per multiply-add. The
    PCA projections (< 0.5% at 256 px) are not counted, as usual for MFU."""
    L, D = model.pos_embed.shape[1:]
    cond_dim = model.t_embedder.mlp[0].out_features
    in_dim = model.x_embedder.proj.weight[0].numel()                   # p * p * C per token
    out_dim = model.final_layer.linear.out_features
    mlp_ratio = model.config["mlp_ratio"]
    per_block = 2 * L * D * D * (4 + 2 * mlp_ratio)    # qkv (3 D^2) + proj (D^2) + MLP (2 r D^2)
    per_block += 2 * 2 * L * L * D                     # Q K^T and attn @ V
    per_block += 2 * cond_dim * 6 * D                  # adaLN modulation (once per image)
    head = 2 * L * D * out_dim + 2 * cond_dim * 2 * D
    freq_dim = model.t_embedder.freq_dim
    embed = 2 * L * in_dim * D + 2 * (freq_dim * cond_dim + cond_dim * cond_dim)
    return 3 * (len(model.blocks) * per_block + head + embed)


def get_args_parser():
    parser = pretrain.get_args_parser()
    parser.prog = "tools/bench_train.py"
    g = parser.add_argument_group("benchmark")
    g.add_argument("--steps", type=cli.bounded(int, 1), default=20,
                   help="optimizer steps timed (after 3 warm-up steps, 10 with --compile)")
    g.add_argument("--peak-tflops", type=cli.bounded(float, 0, low_open=True), default=None,
                   help="per-device peak for MFU (default: a table of known GPUs)")
    return parser


def benchmark(args, rank, world, device):
    distributed.check_layout(args, world)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = registry.build_model(args.model, None, **pretrain.model_overrides(args)).to(device)
    cfg, micro_size = model.config, args.batch_size // (world * args.accum_iter)
    engine, cuda = Engine(model, args, rank, world, device), device.type == "cuda"
    shape = (3, cfg["img_size"], cfg["img_size"])
    if cfg.get("input") == "latents":
        shape = (cfg["latent_channels"], cfg["latent_size"], cfg["latent_size"])
    x = torch.rand(micro_size, *shape, device=device) * 2 - 1
    micro = [(x, torch.zeros(micro_size, dtype=torch.long, device=device))] * args.accum_iter
    warmup = 10 if args.compile else 3             # compile: 2 graphs
    for i in range(warmup + args.steps):
        if i == warmup:                            # synced at both ends of the timed steps
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        engine.step(micro, i, 1e-4)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    ips, flops = args.steps * args.batch_size / secs, train_flops_per_image(model)
    tflops = ips * flops / world / 1e12            # per device
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in name), None)
    res = {"kind": "benchmark", "model": args.model, "img_size": cfg["img_size"],
           "precision": engine.prec, "compile": bool(args.compile), "world": world,
           "global_batch": args.batch_size, "steps": args.steps,
           "step_s": round(secs / args.steps, 4), "img_per_s": round(ips, 2),
           "train_gflops_per_img": round(flops / 1e9, 2), "tflops_per_device": round(tflops, 3),
           "peak_tflops": peak, "mfu": round(tflops / peak, 4) if peak else None, "device": name,
           "peak_mem_gb": None}
    if cuda:
        res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if rank == 0:
        mfu = res["mfu"] if peak else "n/a (give --peak-tflops)"
        print(f"[benchmark] {res['img_per_s']} img/s, {res['train_gflops_per_img']} GFLOPs/img, "
              f"{res['tflops_per_device']} TFLOP/s per device, MFU {mfu}")
        print(json.dumps(res), flush=True)
    return res


def main(args):
    with torch.device("meta"):                     # the model's own image size, as pretrain.py
        args.input_size = registry.build_model(
            args.model, None, **pretrain.model_overrides(args)).config["img_size"]
    return distributed.run_distributed(benchmark, args)


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
