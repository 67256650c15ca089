"""The center, rrc and eval transforms of DataLoader workers -> [-1, 1], DiT's range (RECIPE s2)."""
import torch
from torchvision import transforms as T

from util.cli import UserError

BICUBIC = T.InterpolationMode.BICUBIC
TRANSFORM_KINDS = ("center", "rrc", "eval")


class ToRGB:
    """A class, not a lambda, so transforms pickle for spawn-started DataLoader workers."""

    def __call__(self, img):
        if isinstance(img, torch.Tensor):                     # uint8 (C, H, W)
            return img.expand(3, -1, -1) if img.shape[0] == 1 else img
        return img.convert("RGB") if img.mode != "RGB" else img


class ToFloat:
    """T.ToTensor for PIL; uint8 tensor -> the same float / 255 (bit-identical values)."""

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            return img.float().div(255)
        return T.functional.to_tensor(img)


class Transform(T.Compose):
    """T.Compose that remembers what it does: --decode gpu redoes it, packed data check its size."""

    def __init__(self, ops, kind, size, scale):
        super().__init__(ops)
        self.kind, self.size, self.scale = kind, size, scale


def eval_resize(input_size):
    """Eval crop's shorter side: x256/224 (MAE) from 64 px up; tiny images would lose content."""
    return int(round(input_size * 256 / 224)) if input_size >= 64 else input_size


def check_transform_kind(kind):
    if kind not in TRANSFORM_KINDS:
        raise UserError(f"unknown transform kind {kind!r}; use center, rrc or eval")


def build_transform(kind, input_size, scale=(0.2, 1.0)):
    """PIL image or uint8 tensor -> (3, input_size, input_size) in [-1, 1]. kind (RECIPE s5, s6):
    center  DiT's ablation setting: shorter side to input_size (bicubic, antialiased), center crop
    rrc     final models: RandomResizedCrop + flip, MAE's scale (0.2, 1); (0.08, 1) for its probe
    eval    the probe's (MAE): shorter side to eval_resize(input_size), center crop"""
    check_transform_kind(kind)
    if kind == "rrc":
        crop = T.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=BICUBIC,
                                   antialias=True)
        geometry = [crop, T.RandomHorizontalFlip()]
    else:
        side = input_size if kind == "center" else eval_resize(input_size)
        geometry = [T.Resize(side, interpolation=BICUBIC, antialias=True), T.CenterCrop(input_size)]
    ops = [ToRGB(), *geometry, ToFloat(), T.Normalize([0.5] * 3, [0.5] * 3)]
    return Transform(ops, kind, input_size, tuple(scale))
