"""The --decode gpu path: DataLoader workers only read the files' bytes; the training process
decodes and augments a whole batch on the device (nvJPEG on CUDA), drawing the same crops and
flips as util/transforms.py does in the workers.
"""
import collections

import torch
import torchvision
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from util.cli import UserError
from util.transforms import BICUBIC, check_transform_kind, eval_resize

try:   # TorchCodec where it is installed and loads (a build for another torch fails here)
    from torchcodec import decoders as torchcodec_decoders
except Exception:
    torchcodec_decoders = None
# The decoders of file bytes: torchvision.io's are deprecated from torchvision 0.29 on (they
# move to TorchCodec, same libjpeg-turbo / nvJPEG); torchvision.io serves while it has them.
DECODERS = ("torchcodec", "torchvision")[torchcodec_decoders is None:]


# The rrc draws use a per-image seed taken from the torch RNG in __getitem__: a function of
# (seed, epoch, index) under util/distributed.Indexed. RawImages: an item (B = 1) or a batch: B
# uint8 1-D tensors (file bytes), B seeds, B paths (for errors), and the transform to apply.
RawImages = collections.namedtuple("RawImages", "jpegs seeds names kind size scale")


class JpegFolder(Dataset):
    """Items: (RawImages of one, label); decoded(ds) gives the same images through PIL (PCA fit)."""

    def __init__(self, base, transform):
        if getattr(transform, "kind", None) is None:
            raise UserError("--decode gpu re-does the center/rrc/eval transforms of "
                            "util/transforms.py on the device; this script passes another "
                            "transform, so use --decode pil")
        self.base, self.kind, self.size = base, transform.kind, transform.size
        self.scale = transform.scale
        # flat-root splits and bench subsets are Subsets of the ImageFolder: map their indices
        indices, folder = range(len(base)), base
        while isinstance(folder, Subset):
            indices, folder = [folder.indices[i] for i in indices], folder.dataset
        self.samples, self.classes = [folder.samples[i] for i in indices], folder.classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        raw = read_bytes(path)
        seed = int(torch.randint(2**62, ()))
        return RawImages([raw], [seed], [path], self.kind, self.size, self.scale), label


def read_bytes(path):
    """A file's bytes as a uint8 tensor (what the decoders take)."""
    try:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    except (OSError, ValueError) as e:                 # ValueError: an empty file
        raise UserError(f"cannot read image file {path} ({e}); remove or replace it") from None


def decode_jpegs(jpegs, device):
    """B JPEG files' bytes -> B uint8 (3, H, W) on `device`, in one call (nvJPEG on CUDA)."""
    if DECODERS[0] == "torchcodec":
        return torchcodec_decoders.decode_jpeg(list(jpegs), mode="RGB", device=device)
    return torchvision.io.decode_jpeg(list(jpegs), mode="RGB", device=device)


def decoded(ds):
    """The dataset with images as tensors (through PIL), for code that reads items itself (PCA
    fit)."""
    return ds.base if isinstance(ds, JpegFolder) else ds


def collate(batch):
    """collate_fn for every mode: tensor items -> default_collate; RawImages items -> one
    RawImages."""
    if not isinstance(batch[0][0], RawImages):
        return torch.utils.data.default_collate(batch)
    first = batch[0][0]
    images = RawImages([raw.jpegs[0] for raw, _ in batch], [raw.seeds[0] for raw, _ in batch],
                       [raw.names[0] for raw, _ in batch], first.kind, first.size, first.scale)
    return images, torch.tensor([label for _, label in batch])


def batch_to_images(x, device):
    """The training loop's `x.to(device)`: tensors move (non_blocking; pinned by the DataLoader),
    a RawImages batch is decoded + augmented on `device` -> (B, 3, S, S) float in [-1, 1]."""
    if isinstance(x, RawImages):
        return decode_batch(x.jpegs, x.size, x.kind, device, seeds=x.seeds, scale=x.scale,
                            names=x.names)
    return x.to(device, non_blocking=True)


def decode_batch(jpegs, size, kind, device, seeds=None, scale=(0.2, 1.0), names=None):
    """B encoded JPEGs (uint8 1-D tensors) -> (B, 3, size, size) float in [-1, 1] on `device`:
    build_transform's ops on uint8 tensors, which draw the same crop and flip for the same seed.
    On CPU the JPEG decoders agree with PIL's (libjpeg-turbo); PIL's bicubic rounds in 8-bit
    fixed point: mean |diff| ~0.002, max ~0.05 (tests)."""
    device = torch.device(device)
    check_transform_kind(kind)
    names = names or [f"image {index} of the batch" for index in range(len(jpegs))]
    if kind == "rrc" and seeds is None:
        seeds = torch.randint(2**62, (len(jpegs),)).tolist()
    try:   # one batched call: on CUDA nvJPEG decodes the batch together
        imgs = decode_jpegs(jpegs, device)
    except RuntimeError:   # a non-JPEG / odd file in the batch (ImageNet has a PNG and CMYK JPEGs)
        imgs = [_decode_any(raw, name).to(device) for raw, name in zip(jpegs, names)]
    out = []
    for index, img in enumerate(imgs):                              # (3, H, W) uint8, sizes differ
        if kind == "rrc":
            out.append(_random_resized_crop(img, size, scale, seeds[index]))
        else:
            side = size if kind == "center" else eval_resize(size)
            resized = T.functional.resize(img, side, BICUBIC, antialias=True)
            out.append(T.functional.center_crop(resized, size))
    # (B, 3, S, S): x / 255 normalised with (0.5, 0.5)
    return torch.stack(out).float().div_(127.5).sub_(1)


def _random_resized_crop(img, size, scale, seed):
    """T.RandomResizedCrop + flip on one uint8 tensor, drawn as build_transform draws them after
    torch.manual_seed(seed); the caller's RNG stream is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, height, width = T.RandomResizedCrop.get_params(img, list(scale),
                                                                  [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
    img = T.functional.resized_crop(img, top, left, height, width, [size, size], BICUBIC,
                                    antialias=True)
    return img.flip(-1) if flip else img


def _decode_any(raw, name):
    """Any image file the decoder reads -> uint8 (3, H, W): an animation's first frame, a 16-bit
    PNG's high byte, as the PIL path has them (values 0..65535 would otherwise reach the model)."""
    try:
        if DECODERS[0] == "torchcodec":
            img = torchcodec_decoders.decode_image(raw, mode="RGB", output_dtype="auto")
        else:
            img = torchvision.io.decode_image(raw, mode="RGB")
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot decode image file {name} ({str(e)[:200]}); "
                        f"remove or replace it") from None
    img = img[0] if img.ndim == 4 else img
    if img.dtype == torch.uint16:
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img
