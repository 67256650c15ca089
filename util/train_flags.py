"""The flags every training stage takes (pretrain.py, distill.py): the schedule, the optimiser
and the run's outputs, with the paper's pre-training defaults (RECIPE s6); a stage sets its own
defaults on top with parser.set_defaults."""
from util.cli import SEED, bounded


def add_training_args(p):
    """The schedule, optimiser and run flags of pretrain.py and distill.py. Defaults: the
    paper's pre-training (RECIPE s6: batch 2048, blr 1e-4, 100 warmup of 400 epochs, wd 0)."""
    num = bounded
    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=num(float, 0, low_open=True), default=400,
                   help="length of the run (may be fractional)")
    g.add_argument("--max-steps", type=num(int, 1), default=None,
                   help="stop (and save) after this many optimizer steps; the schedule is "
                   "unchanged")
    g.add_argument("--batch-size", type=num(int, 1), default=2048, help="the GLOBAL batch: "
                   "ranks x --accum-iter x micro-batch (MAE's --batch_size is per GPU)")
    g.add_argument("--accum-iter", type=num(int, 1), default=1,
                   help="micro-batches per optimizer step and rank")
    g.add_argument("--blr", type=num(float, 0), default=1e-4,
                   help="lr = blr x batch / 256 (paper: 1e-4, i.e. 8e-4 at 2048)")
    g.add_argument("--lr", type=num(float, 0), default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=num(float, 0), default=0.0, help="floor of the cosine")
    g.add_argument("--warmup-epochs", type=num(float, 0), default=100, help="linear warmup")
    g.add_argument("--weight-decay", type=num(float, 0), default=0.0,
                   help="AdamW decay of the matrices (paper: 0)")
    g.add_argument("--ema", type=num(float, 0, 1, high_open=True), default=0.9999,
                   help="EMA decay, warmed up as (1+step)/(10+step); 0 = off")
    g.add_argument("--clip-grad", type=num(float, 0, low_open=True), default=None,
                   help="max gradient norm (default: no clipping)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the loss path")
    g.add_argument("--aug", default="center", choices=["center", "rrc"],
                   help="center crop (the ablations) or RandomResizedCrop + flip (final models)")
    g.add_argument("--seed", type=SEED, default=0, help="fixes init, data order, crops and noise")
    g = p.add_argument_group("run: outputs and resume")
    g.add_argument("--output-dir", default="out",
                   help="checkpoint.pt, checkpoint-EPOCH.pt, log.jsonl, grid*.png, pca.pt")
    g.add_argument("--resume", default=None,
                   help="'auto' (OUTPUT_DIR/checkpoint.pt when present) or a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an OUTPUT_DIR that holds a previous run's checkpoint")
    g.add_argument("--save-every", type=num(int, 1), default=20,
                   help="epochs between kept checkpoints (and one at the end)")
    g.add_argument("--log-every", type=num(int, 1), default=50,
                   help="steps between log lines (the only host syncs)")
    g.add_argument("--grid-every", type=num(int, 1), default=20,
                   help="epochs between denoising grids (and one at the end)")
    return p
