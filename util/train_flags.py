"""The flags of every training stage; a stage sets its own defaults on top (parser.set_defaults)."""
from util.cli import SEED, bounded


def add_training_args(p):
    """pretrain.py's and distill.py's flags; defaults: the paper's pre-training (RECIPE s6)."""
    num = bounded
    add = p.add_argument_group("schedule and optimiser").add_argument
    add("--epochs", type=num(float, 0, low_open=True), default=400,
        help="length of the run (may be fractional)")
    add("--max-steps", type=num(int, 1),
        help="stop (and save) after this many optimizer steps; the schedule is unchanged")
    add("--batch-size", type=num(int, 1), default=2048,
        help="the GLOBAL batch: ranks x --accum-iter x micro-batch (MAE's --batch_size is per GPU)")
    add("--accum-iter", type=num(int, 1), default=1,
        help="micro-batches per optimizer step and rank")
    add("--blr", type=num(float, 0), default=1e-4,
        help="lr = blr x batch / 256 (paper: 1e-4, i.e. 8e-4 at 2048)")
    add("--lr", type=num(float, 0), help="absolute lr (overrides --blr)")
    add("--min-lr", type=num(float, 0), default=0.0, help="floor of the cosine")
    add("--warmup-epochs", type=num(float, 0), default=100, help="linear warmup")
    add("--weight-decay", type=num(float, 0), default=0.0,
        help="AdamW decay of the matrices (paper: 0)")
    add("--ema", type=num(float, 0, 1, high_open=True), default=0.9999,
        help="EMA decay, warmed up as (1+step)/(10+step); 0 = off")
    add("--clip-grad", type=num(float, 0, low_open=True),
        help="max gradient norm (default: no clipping)")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
        help="auto: bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    add("--compile", action="store_true", help="torch.compile the loss path")
    add("--aug", default="center", choices=["center", "rrc"],
        help="center crop (the ablations) or RandomResizedCrop + flip (final models)")
    add("--seed", type=SEED, default=0, help="fixes init, data order, crops and noise")
    add = p.add_argument_group("run: outputs and resume").add_argument
    add("--output-dir", default="out",
        help="checkpoint.pt, checkpoint-EPOCH.pt, log.jsonl, grid*.png, pca.pt")
    add("--resume", help="'auto' (OUTPUT_DIR/checkpoint.pt when present) or a checkpoint path")
    add("--overwrite", action="store_true",
        help="start over in an OUTPUT_DIR that holds a previous run's checkpoint")
    add("--save-every", type=num(int, 1), default=20,
        help="epochs between kept checkpoints (and one at the end)")
    add("--log-every", type=num(int, 1), default=50,
        help="steps between log lines (the only host syncs)")
    add("--grid-every", type=num(int, 1), default=20,
        help="epochs between denoising grids (and one at the end)")
    return p
