"""How an image becomes a training tensor: the center, rrc and eval transforms that DataLoader
workers apply to a PIL image or a uint8 tensor (util/decode.py redoes them on the device). Out:
(3, S, S) float in [-1, 1] (DiT normalisation, RECIPE s2), grayscale repeated to 3 channels.
"""
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
    """T.Compose that remembers what it does, for --decode gpu to redo it on the device and the
    packed path to check its stored size."""

    def __init__(self, ops, kind, size, scale):
        super().__init__(ops)
        self.kind, self.size, self.scale = kind, size, scale


def eval_resize(input_size):
    """Shorter side before the eval center crop: x256/224 (MAE), except below 64 px (see below)."""
    return int(round(input_size * 256 / 224)) if input_size >= 64 else input_size


def check_transform_kind(kind):
    if kind not in TRANSFORM_KINDS:
        raise UserError(f"unknown transform kind {kind!r}; use center, rrc or eval")


def build_transform(kind, input_size, scale=(0.2, 1.0)):
    """PIL image or uint8 tensor -> (3, input_size, input_size) in [-1, 1]. kind:
    center  DiT's ablation setting (RECIPE s6): shorter side to input_size (bicubic, antialiased),
            center crop;
    rrc     final models (RECIPE s6): RandomResizedCrop + flip, MAE's pre-training scale (0.2, 1);
            (0.08, 1) for MAE's probe;
    eval    the probe's (RECIPE s5, MAE): resize to input_size * 256/224, center crop; below 64 px
            only resize + crop (tiny object-centred images would lose content)."""
    check_transform_kind(kind)
    if kind == "rrc":
        crop = T.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=BICUBIC,
                                   antialias=True)
        geometry = [crop, T.RandomHorizontalFlip()]
    else:
        side = input_size if kind == "center" else eval_resize(input_size)
        geometry = [T.Resize(side, interpolation=BICUBIC, antialias=True),
                    T.CenterCrop(input_size)]
    ops = [ToRGB(), *geometry, ToFloat(), T.Normalize([0.5] * 3, [0.5] * 3)]
    return Transform(ops, kind, input_size, tuple(scale))
