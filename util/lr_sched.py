"""The learning-rate schedule of every trainer here (pre-training, distillation, the probe)."""
import math


def lr_at(step, steps_per_epoch, base_lr, warmup_epochs, epochs, min_lr=0.0):
    """Linear warmup, then half-cycle cosine to min_lr on the fractional epoch (MAE; RECIPE s6)."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1e-12, epochs - warmup_epochs))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(args):
    """--lr, or MAE's linear scaling rule lr = --blr x global batch / 256 (RECIPE s6)."""
    return args.lr if args.lr is not None else args.blr * args.batch_size / 256
