"""--decode gpu: DataLoader workers only read the files' bytes; the training process decodes and
augments a batch on the device (nvJPEG on CUDA), drawing util/transforms.py's crops and flips."""
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
# torchvision.io's decoders (deprecated from 0.29 for TorchCodec's, same libraries): the fallback
DECODERS = ("torchcodec", "torchvision")[torchcodec_decoders is None:]

# An item (B = 1) or a batch: B uint8 1-D tensors (file bytes), B rrc seeds, B paths, the transform
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
        seed = int(torch.randint(2**62, ()))   # f(seed, epoch, index) under distributed.Indexed
        return RawImages([raw], [seed], [path], self.kind, self.size, self.scale), label


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    except (OSError, ValueError) as e:                 # ValueError: an empty file
        raise UserError(f"cannot read image file {path} ({e}); remove or replace it") from None


def decoded(ds):
    """The dataset with images as tensors (through PIL), for code reading items itself (PCA fit)."""
    return ds.base if isinstance(ds, JpegFolder) else ds


def collate(batch):
    """collate_fn for every mode: RawImages items -> one RawImages, others -> default_collate."""
    if not isinstance(batch[0][0], RawImages):
        return torch.utils.data.default_collate(batch)
    first = batch[0][0]
    images = RawImages([raw.jpegs[0] for raw, _ in batch], [raw.seeds[0] for raw, _ in batch],
                       [raw.names[0] for raw, _ in batch], first.kind, first.size, first.scale)
    return images, torch.tensor([label for _, label in batch])


def batch_to_images(x, device):
    """The loop's `x.to(device)`; a RawImages batch is decoded + augmented there -> (B, 3, S, S)."""
    if isinstance(x, RawImages):
        return decode_batch(x.jpegs, x.size, x.kind, device, seeds=x.seeds, scale=x.scale,
                            names=x.names)
    return x.to(device, non_blocking=True)


def decode_batch(jpegs, size, kind, device, seeds=None, scale=(0.2, 1.0), names=None):
    """B encoded JPEGs -> (B, 3, size, size) in [-1, 1] on `device`, build_transform's crop and flip
    for the same seed; vs PIL on CPU (8-bit bicubic): mean |diff| ~0.002, max ~0.05 (tests)."""
    device = torch.device(device)
    check_transform_kind(kind)
    names = names or [f"image {index} of the batch" for index in range(len(jpegs))]
    if kind == "rrc" and seeds is None:
        seeds = torch.randint(2**62, (len(jpegs),)).tolist()
    library = torchcodec_decoders if DECODERS[0] == "torchcodec" else torchvision.io
    try:   # one batched call: on CUDA nvJPEG decodes the batch together
        imgs = library.decode_jpeg(list(jpegs), mode="RGB", device=device)
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
    return torch.stack(out).float().div_(127.5).sub_(1)    # x / 255, normalised with (0.5, 0.5)


def _random_resized_crop(img, size, scale, seed):
    """RandomResizedCrop + flip of a uint8 image as build_transform draws them after seed(seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, height, width = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
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
