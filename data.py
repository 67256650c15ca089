"""Datasets, transforms and the CLI error convention shared by every l-DAE script.

`--dataset` / `--data-path` mean the same in tokenizer_pca.py, pretrain.py and linprobe.py:
  synthetic     procedurally drawn shapes/textures (default; offline, deterministic, 10 classes)
  imagefolder   ImageNet layout: --data-path root/ with class folders, or root/train + root/val
  fashion-mnist torchvision's FashionMNIST; offline from a folder of the original gz files, e.g.
                Debian's `apt-get install dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist
  cifar10       torchvision's CIFAR10 (--download, or a folder holding cifar-10-batches-py)
  packed        a uint8 file written once by `python data.py pack` (below): no JPEG decoding in training

Feeding a GPU: vit_b trains at ~1,790 img/s per H100 at 50% MFU; PIL decode + rrc costs
~3-4 ms per 500x375 JPEG on one core (`bench`), i.e. >= 6-8 cores per GPU. Two faster paths, same
transforms, same [-1, 1] output:
  --dataset packed  decode once: `pack` resizes (shorter side, bicubic) + center-crops every image to
                    S x S in one uint8 .npy memmap + FILE.meta.pt. S = --input-size for "center"
                    ablations (bit-identical to imagefolder); S = 288-320 for rrc, so large crops keep
                    detail (the square crop drops the sides of wide photos). ImageNet train: 252 GB at
                    256, 318 GB at 288. `{split}` in --data-path -> train/val; else one file, 10% val.
  --decode gpu      imagefolder, pretrain.py only: workers only read bytes; batch_to_images decodes the
                    batch with torchvision.io.decode_jpeg(device="cuda") and crops/flips on the GPU.
Commands:
  python data.py pack --dataset imagefolder --data-path /data/imagenet --split train --input-size 288 \
      --out /data/in1k_train_288.u8 --num-workers 16     # train with --dataset packed --data-path FILE
  python data.py bench --data-path /tmp/jpegs --make 1000 --input-size 256 --workers 0,1,2
      (--make N: first write N synthetic 500x375 q90 JPEGs there; prints a markdown table)
  python tokenizer_pca.py --dataset fashion-mnist --data-path /usr/share/datasets/fashion-mnist \
      --input-size 32 --patch-size 4 --out /tmp/pca_fm.pt      (any script that calls add_data_args)

Contract: images are float (3, H, W) in [-1, 1] (DiT normalisation, RECIPE s2), grayscale repeated to
3 channels. Bad user input raises UserError; run_cli prints `error: <msg>` and exits 2 (no traceback).
"""
import argparse
import collections
import contextlib
import errno
import gzip
import math
import os
import resource
import shutil
import sys
import time
import uuid
import zlib

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from tqdm import tqdm

DATASETS = ("synthetic", "imagefolder", "fashion-mnist", "cifar10", "packed")
BICUBIC = T.InterpolationMode.BICUBIC


class UserError(Exception):
    """A problem the user can fix (bad path, missing files, bad flag): printed without traceback.
    A DataLoader worker's exception is re-raised as type("Caught UserError in DataLoader worker ...
    Original Traceback ... UserError: <msg>") (torch/_utils.py ExceptionWrapper): we recover <msg>."""

    def __init__(self, msg=""):
        msg = str(msg)
        if "Original Traceback" in msg and "UserError: " in msg:
            msg = msg.rsplit("UserError: ", 1)[1].strip()
        super().__init__(msg)


class Interrupted(Exception):
    """A run stopped on purpose by a signal (SIGTERM from a cluster, Ctrl-C) after saving what
    lets it resume: run_cli prints the message and exits with 128 + the signal number."""

    def __init__(self, msg, signum):
        super().__init__(msg)
        self.exit_code = 128 + signum


def run_cli(main, parser, argv=None):
    """Parse argv, run main(args). House rule: a UserError is one `error: msg` line and exit 2; a
    signal-stopped run says what it saved; Ctrl-C outside a training loop exits 130, no traceback."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the house conventions: every flag's default shown in --help, and a bad flag
    reported as one `error: ...` line with exit 2 (argparse's own format adds a usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def bounded(kind, low, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) checked to lie in [low, high]; *_open excludes the
    end. `--epochs -3` then stops at parse time with one line instead of running a step."""
    def parse(text):
        value = kind(text)                                 # ValueError: argparse says "invalid"
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            rule = f"> {low}" if low_open else f">= {low}"
            if high is not None:
                rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__                         # argparse's "invalid int value" text
    return parse


# ---- Files: one way to write them (atomic, durable, a full disk said plainly) and one way to
# read the torch files a user names (missing, unreadable and code-running files refused by name).
def temp_name(path):
    """A temporary name beside `path` that no other process uses (pid + random): any number of
    processes may write the same file at once, and each rename puts a complete file in place."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def clean_stale_temps(folder, names):
    """Remove the temporary files (temp_name's) a killed writer left in `folder` for the files
    whose names start with one of `names` -> their names."""
    stale = [f for f in os.listdir(folder) if f.endswith(".tmp")
             and any(f.startswith(n) for n in names)]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return stale


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nbytes(obj):
    """Bytes of the tensors in a nested dict/list (what torch.save of it needs, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def write_error(e, path, size_hint=None):
    """An OSError while writing `path` -> the UserError a user can act on."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) \
        else "nothing was written"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"it needs about {size_hint / 1e6:.1f} MB, " if size_hint else ""
        free = shutil.disk_usage(folder).free / 1e6
        return UserError(f"no space left on the device writing {path} ({need}{free:.1f} MB free "
                         f"in {folder}); {kept}. Free some space or write elsewhere")
    return UserError(f"cannot write {path} ({e.strerror or e}); {kept}. Choose a writable folder")


def atomic_write(path, write, size_hint=None):
    """write(tmp) fills a temporary file beside `path`; it is fsync'ed, renamed over `path`, and
    the folder fsync'ed. So `path` always holds the old file or the whole new one, even after a
    kill or a power loss; no temporary file is left; an OSError (full disk, read-only folder)
    becomes a UserError naming the file and saying the old one is intact."""
    tmp = temp_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)), directory=True)
    except OSError as e:
        raise write_error(e, path, size_hint) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_torch(obj, path):
    """torch.save through atomic_write: the one way this project writes a .pt file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), nbytes(obj))


def load_torch(path, what, fix):
    """torch.load(weights_only=True) of a file the user named. A missing or unreadable file, or
    one that holds pickled Python objects (loading those would run code), is one UserError that
    names `what` and the path and ends with `fix`."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled objects
        if "Weights only load failed" in str(e):
            raise UserError(f"refused {what} {path}: it holds pickled Python objects, and loading "
                            f"them would run their code; only tensors and plain containers are "
                            f"read. {fix}") from None
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}: {str(e)[:200]}); "
                        f"{fix}") from None


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)


def progress(**kwargs):
    """A tqdm bar. Written to a file (a cluster log) rather than a terminal, it redraws once a
    minute instead of several times a second: ~100 bytes per step would be ~27 MB per run."""
    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.1 if interactive else 60, dynamic_ncols=interactive, **kwargs)


def check_writable_dir(folder, flag):
    """Create `folder` if needed and prove it takes a file, before any work is done."""
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); pass another {flag}") from None


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="synthetic needs no files; the others read --data-path")
    g.add_argument("--data-path", default=None, help="imagefolder: root/ (class folders) or root/{train,val};"
                   " fashion-mnist: folder of *-ubyte(.gz) files; cifar10: folder with cifar-10-batches-py; "
                   "packed: the file from `python data.py pack` ({split} -> train/val)")
    g.add_argument("--decode", default="pil", choices=["pil", "gpu"], help="imagefolder: pil = decode + "
                   "augment in DataLoader workers; gpu (pretrain.py) = on the training device")
    g.add_argument("--download", action="store_true",
                   help="fashion-mnist/cifar10: let torchvision download into --data-path (needs internet)")
    g.add_argument("--input-size", type=bounded(int, 1), default=256,
                   help="image side in pixels (paper: 256)")
    g.add_argument("--num-workers", type=bounded(int, 0), default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (0: load in the main process)")
    g.add_argument("--synthetic-size", type=bounded(int, 1), default=2000,
                   help="synthetic: train images")
    g.add_argument("--synthetic-val-size", type=bounded(int, 1), default=None,
                   help="synthetic: val images (default: 1/4 of --synthetic-size)")
    g.add_argument("--synthetic-seed", type=int, default=0, help="synthetic: seed (train/val: other streams)")
    return parser


# ---- Transforms: RGB first (grayscale -> 3 equal channels), [-1, 1] = Normalize(0.5, 0.5) last (DiT).
# Input: a PIL image or a uint8 (C, H, W) tensor (packed): the geometric ops draw alike on both.
class ToRGB:
    """A class, not a lambda, so transforms pickle for spawn-started DataLoader workers."""

    def __call__(self, img):
        if isinstance(img, torch.Tensor):                     # uint8 (C, H, W)
            return img.expand(3, -1, -1) if img.shape[0] == 1 else img
        return img.convert("RGB") if img.mode != "RGB" else img


class ToFloat:
    """T.ToTensor for PIL; uint8 tensor -> the same float / 255 (bit-identical values)."""

    def __call__(self, img):
        return img.float().div(255) if isinstance(img, torch.Tensor) else T.functional.to_tensor(img)


def eval_resize(input_size):
    """Shorter side before the eval center crop: x256/224 (MAE), except below 64 px (see below)."""
    return int(round(input_size * 256 / 224)) if input_size >= 64 else input_size


def build_transform(kind, input_size, scale=(0.2, 1.0)):
    """kind: "center" | "rrc" | "eval"; PIL image or uint8 tensor -> (3, input_size, input_size) in [-1, 1].

    center: DiT's ablation setting (RECIPE s6): shorter side to input_size (bicubic + antialias, close
            to DiT's box-then-bicubic), center crop.
    rrc:    final models (RECIPE s6): RandomResizedCrop + flip; scale (0.2, 1) is MAE's pre-training
            crop, which the paper follows; pass (0.08, 1) for MAE's probe.
    eval:   probe (RECIPE s5, MAE): resize to input_size * 256/224, center crop; below 64 px only resize
            + crop (tiny object-centred images would lose content). .kind/.size/.scale: for decode_batch.
    """
    if kind == "center":
        geo = [T.Resize(input_size, interpolation=BICUBIC, antialias=True), T.CenterCrop(input_size)]
    elif kind == "rrc":
        geo = [T.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=BICUBIC, antialias=True),
               T.RandomHorizontalFlip()]
    elif kind == "eval":
        geo = [T.Resize(eval_resize(input_size), interpolation=BICUBIC, antialias=True), T.CenterCrop(input_size)]
    else:
        raise UserError(f"unknown transform kind {kind!r}; use center, rrc or eval")
    tf = T.Compose([ToRGB(), *geo, ToFloat(), T.Normalize([0.5] * 3, [0.5] * 3)])
    tf.kind, tf.size, tf.scale = kind, input_size, tuple(scale)
    return tf


# ---- Synthetic shapes (offline default): ten classes that differ only in shape/texture/layout; colour,
# position, size, rotation, background and noise are random for all, so no pixel (nor a linear map of
# the pixels) gives the class away, while shape features do. Image i has its own generator seeded by
# (seed, split stream, i): deterministic, independent of batching/workers, any resolution, no memory.
SYNTHETIC_CLASSES = ("disc", "ring", "square", "triangle", "cross",
                     "h-stripes", "v-stripes", "checkerboard", "two-blobs", "polka-dots")


class SyntheticShapes(Dataset):
    classes = list(SYNTHETIC_CLASSES)

    def __init__(self, size=2000, img_size=32, seed=0, stream=0, transform=None):
        self.size, self.img_size, self.seed, self.stream = size, img_size, seed, stream
        self.transform = transform

    def __len__(self):
        return self.size

    def render(self, index):
        """-> (uint8 (3, S, S) tensor, label). Label cycles so classes are exactly balanced."""
        label = index % len(SYNTHETIC_CLASSES)
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.stream) * 1_000_003 + index) % 2**63)
        u = lambda *s: torch.rand(s, generator=g)  # noqa: E731  uniform [0, 1)
        # Draw at 2x and average-pool: cheap anti-aliasing so edges are not pure staircase.
        S = self.img_size * 2 if self.img_size <= 128 else self.img_size
        ax = (torch.arange(S) + 0.5) / S * 2 - 1                          # pixel centres in [-1, 1]
        yy, xx = torch.meshgrid(ax, ax, indexing="ij")                     # (S, S)
        cx, cy = (u(2) - 0.5) * 0.9                                        # object centre
        r = 0.3 + 0.3 * u(1)                                               # object half-size
        th = (u(1) - 0.5) * (math.pi / 4.5)                                # +-20 deg: keeps h/v stripes apart
        c, s = torch.cos(th), torch.sin(th)
        pu = ((xx - cx) * c + (yy - cy) * s) / r                           # object frame, ~[-1, 1]
        pv = (-(xx - cx) * s + (yy - cy) * c) / r
        rad, box = (pu ** 2 + pv ** 2).sqrt(), torch.maximum(pu.abs(), pv.abs())
        freq, ph = (2.5 + 2.5 * u(1)) * math.pi, u(1) * 2 * math.pi        # texture frequency / phase
        m = {"disc": lambda: rad <= 1,
             "ring": lambda: (rad <= 1) & (rad >= 0.6),
             "square": lambda: box <= 0.85,
             "triangle": lambda: (pv <= 0.75) & (pv >= -0.95 + 1.9 * pu.abs()),
             "cross": lambda: ((pu.abs() <= 0.3) | (pv.abs() <= 0.3)) & (box <= 0.95),
             "h-stripes": lambda: (box <= 0.95) & (torch.sin(freq * pv + ph) > 0),
             "v-stripes": lambda: (box <= 0.95) & (torch.sin(freq * pu + ph) > 0),
             "checkerboard": lambda: (box <= 0.95) & (torch.sin(freq * pu + ph) * torch.sin(freq * pv + ph) > 0),
             "two-blobs": lambda: ((pu - 0.55) ** 2 + pv ** 2 <= 0.2) | ((pu + 0.55) ** 2 + pv ** 2 <= 0.2),
             "polka-dots": lambda: (box <= 0.95) & (torch.cos(freq * pu + ph) + torch.cos(freq * pv + ph) > 1.0),
             }[SYNTHETIC_CLASSES[label]]()                                      # (S, S) bool
        # background: random colour + linear gradient; foreground redrawn until clearly different (visible)
        bg = u(3)
        for _ in range(20):
            fg = u(3)
            if (fg - bg).abs().sum() > 0.6:
                break
        gdir = u(2) * 2 - 1
        grad = 0.25 * (gdir[0] * xx + gdir[1] * yy)                        # (S, S)
        img = bg[:, None, None] + grad[None] * (u(3)[:, None, None] * 2 - 1)
        img = torch.where(m[None], fg[:, None, None].expand(3, S, S), img)
        if S != self.img_size:
            img = torch.nn.functional.avg_pool2d(img[None], 2)[0]
        img = img + 0.04 * torch.randn(img.shape, generator=g)              # sensor-like noise
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), label

    def __getitem__(self, index):
        img, label = self.render(index)
        pil = T.functional.to_pil_image(img)
        return (self.transform(pil) if self.transform is not None else pil), label


# ---- ImageFolder: checks up front, and a loader that names the bad file.
def _checked_loader(path):
    """PIL loader: a decoding failure becomes a UserError naming the file (checked lazily: checking
    every file up front would cost a full pass over ImageNet)."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                # 16-bit grayscale: PIL's convert("RGB") would clip every value above 255 to
                # white; keep the high byte instead, as PIL does for 16-bit colour PNGs
                high = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(high)
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise UserError(f"cannot read image file {path} ({type(e).__name__}: {e}); "
                        "remove or replace it") from None


def _build_imagefolder(path, split, transform):
    if not path:
        raise UserError("--dataset imagefolder needs --data-path (a folder of class folders, "
                        "or one with train/ and val/)")
    if not os.path.isdir(path):
        raise UserError(f"data path {path} does not exist or is not a folder")
    if not os.listdir(path):
        raise UserError(f"data path {path} is empty; expected class folders or train/ and val/")
    has_splits = os.path.isdir(os.path.join(path, "train"))
    root = os.path.join(path, split) if has_splits else path
    if has_splits and not os.path.isdir(root):
        raise UserError(f"{path} has train/ but no {split}/ folder; add {root} or use a flat root")
    classes = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    if not classes:
        raise UserError(f"{root} has no class sub-folders; put images in {root}/<class>/")
    ds = torchvision.datasets.ImageFolder(root, transform=transform, loader=_checked_loader, allow_empty=True)
    if len(ds) == 0:
        raise UserError(f"no images found in the class folders of {root} "
                        f"(extensions {', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)})")
    empty = sorted(set(ds.classes) - {ds.classes[y] for y in ds.targets})
    if empty:
        # the class keeps its index (so train and val agree), but no image teaches it: a probe
        # head would have an output that never trains
        print(f"[data] warning: {len(empty)} class folder(s) of {root} hold no images: "
              f"{', '.join(empty[:10])}; add images or remove the folder(s)", flush=True)
    if has_splits:
        return ds, root
    return Subset(ds, _holdout(ds.targets, split)), f"{root} (flat root: every 10th image per class is val)"


def _holdout(labels, split):
    """One flat folder / packed file serves both splits: every 10th image per class is val, so
    the probe is never scored on its own training images. -> indices of `split`."""
    seen, keep = collections.Counter(), []
    for i, y in enumerate(labels):
        if (seen[int(y)] % 10 == 0) == (split == "val"):
            keep.append(i)
        seen[int(y)] += 1
    return keep


# ---- Packed format (`python data.py pack`): FILE = .npy uint8 (N, 3, S, S), each image decoded once,
# shorter side to S and center-cropped (the "center" transform's PIL ops); FILE.meta.pt = {"version",
# "shape", "size", "labels" (N,) int64, "classes", "source"}. Channels-first: an item is a zero-copy view.
PACK_CMD = "python data.py pack --dataset imagefolder --data-path DIR --split train --input-size 288 --out"


class Packed(Dataset):
    def __init__(self, path, transform=None):
        meta_path = path + ".meta.pt"
        if not os.path.isfile(path):
            raise UserError(f"packed file {path} does not exist; write it once with `{PACK_CMD} {path}`")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} (labels, classes) is missing, so {path} was not written to the "
                            f"end; re-run `{PACK_CMD} {path}`")
        meta = load_torch(meta_path, "packed meta file", f"re-write it with `{PACK_CMD} {path}`")
        try:
            arr = np.load(path, mmap_mode="r")                # reads the header only
        except Exception as e:
            raise UserError(f"{path} is not a packed uint8 file ({type(e).__name__}: {str(e)[:200]}); "
                            f"re-write it with `{PACK_CMD} {path}`") from None
        if not (isinstance(meta, dict) and meta.get("version") == 1 and arr.dtype == np.uint8
                and list(arr.shape) == meta.get("shape") and arr.ndim == 4 and arr.shape[1] == 3
                and arr.shape[2] == arr.shape[3] and len(meta.get("labels", ())) == len(arr)):
            raise UserError(f"{path} (shape {tuple(arr.shape)}, {arr.dtype}) does not match {meta_path} "
                            f"(shape {meta.get('shape') if isinstance(meta, dict) else '?'}); re-write both "
                            f"with `{PACK_CMD} {path}`")
        self.path, self.transform, self.size = path, transform, arr.shape[2]
        self.labels, self.classes = meta["labels"].tolist(), list(meta["classes"])
        self._arr = None

    def __getstate__(self):   # a memmap pickles as a full in-memory copy: re-open it in each worker
        return {**self.__dict__, "_arr": None}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self._arr is None:  # "c" = copy-on-write: writable for torch.from_numpy, never written back
            self._arr = np.load(self.path, mmap_mode="c")
        x = torch.from_numpy(self._arr[i])                        # (3, S, S) uint8, pages of the file
        return (self.transform(x) if self.transform is not None else x), self.labels[i]


def _build_packed(path, split, transform):
    if not path:
        raise UserError(f"--dataset packed needs --data-path FILE, written once by `{PACK_CMD} FILE`")
    ds = Packed(path.replace("{split}", split), transform)
    want = getattr(transform, "size", 0)
    if ds.size < want:
        raise UserError(f"{ds.path} holds {ds.size}x{ds.size} images, smaller than --input-size {want}; "
                        f"re-pack at --input-size {want} (center) or 288-320 (rrc)")
    if getattr(transform, "kind", None) == "center" and ds.size != want:
        print(f"[data] note: {ds.path} is {ds.size}px; center crops at {want}px resize a second time "
              f"(pack at --input-size {want} for the exact DiT ablation input)")
    if "{split}" in path:
        return ds, ds.path
    return Subset(ds, _holdout(ds.labels, split)), f"{ds.path} (one file: every 10th image per class is val)"


# ---- --decode gpu: workers only read the files; the training process decodes a whole batch with
# decode_jpeg(list, device="cuda") (nvJPEG) and crops / resizes / flips on the GPU. The rrc draws use
# a per-image seed taken from the torch RNG in __getitem__: a function of (seed, epoch, index) under
# pretrain.Indexed. RawImages: an item (B = 1) or batch: B uint8 1-D tensors (file bytes), B seeds,
# B paths (for errors), and the transform to apply.
RawImages = collections.namedtuple("RawImages", "jpegs seeds names kind size scale")


class JpegFolder(Dataset):
    """Items: (RawImages of one, label); decoded(ds) gives the same images through PIL (PCA fit)."""

    def __init__(self, base, transform):
        if getattr(transform, "kind", None) is None:
            raise UserError("--decode gpu re-does the center/rrc/eval transforms of data.build_transform on "
                            "the device; this script passes another transform, so use --decode pil")
        self.base, self.kind, self.size, self.scale = base, transform.kind, transform.size, transform.scale
        idx, folder = range(len(base)), base
        while isinstance(folder, Subset):                             # flat-root split, bench subsets
            idx, folder = [folder.indices[i] for i in idx], folder.dataset
        self.samples, self.classes = [folder.samples[i] for i in idx], folder.classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        try:   # clone(): read_file's storage is a file mapping that claims to be shared memory but has
            raw = torchvision.io.read_file(path).clone()   # no fd: sent from a worker, EBADF and a hang
        except RuntimeError as e:
            raise UserError(f"cannot read image file {path} ({e}); remove or replace it") from None
        seed = int(torch.randint(2**62, ()))
        return RawImages([raw], [seed], [path], self.kind, self.size, self.scale), y


def decoded(ds):
    """The dataset with images as tensors (through PIL), for code that reads items itself (PCA fit)."""
    return ds.base if isinstance(ds, JpegFolder) else ds


def collate(batch):
    """collate_fn for every mode: tensor items -> default_collate; RawImages items -> one RawImages."""
    if not isinstance(batch[0][0], RawImages):
        return torch.utils.data.default_collate(batch)
    r = batch[0][0]
    return (RawImages([x.jpegs[0] for x, _ in batch], [x.seeds[0] for x, _ in batch],
                      [x.names[0] for x, _ in batch], r.kind, r.size, r.scale), torch.tensor([y for _, y in batch]))


def batch_to_images(x, device):
    """The training loop's `x.to(device)`: tensors move (non_blocking; pinned by the DataLoader),
    a RawImages batch is decoded + augmented on `device` -> (B, 3, S, S) float in [-1, 1]."""
    if isinstance(x, RawImages):
        return decode_batch(x.jpegs, x.size, x.kind, device, seeds=x.seeds, scale=x.scale, names=x.names)
    return x.to(device, non_blocking=True)


def decode_batch(jpegs, size, kind, device, seeds=None, scale=(0.2, 1.0), names=None):
    """B encoded JPEGs (uint8 1-D tensors) -> (B, 3, size, size) float in [-1, 1] on `device`.
    build_transform's ops on uint8 tensors: seeded alike (manual_seed(s) before the PIL transform,
    seeds=[s] here) they draw the same crop and flip. On CPU decode_jpeg and PIL decode alike
    (libjpeg-turbo); PIL's bicubic rounds in 8-bit fixed point: mean |diff| ~0.002, max ~0.05 (tests).
    nvJPEG's IDCT / chroma upsampling differs by a few more grey levels (to be measured on the GPU)."""
    device, B = torch.device(device), len(jpegs)
    if kind not in ("center", "rrc", "eval"):
        raise UserError(f"unknown transform kind {kind!r}; use center, rrc or eval")
    names = names or [f"image {b} of the batch" for b in range(B)]
    if kind == "rrc" and seeds is None:
        seeds = torch.randint(2**62, (B,)).tolist()
    try:   # one batched call: on CUDA nvJPEG decodes the batch together
        imgs = torchvision.io.decode_jpeg(list(jpegs), mode=torchvision.io.ImageReadMode.RGB, device=device)
    except RuntimeError:   # a non-JPEG / odd file in the batch (ImageNet has a PNG and CMYK JPEGs)
        imgs = [_decode_any(j, n).to(device) for j, n in zip(jpegs, names)]
    F, out = T.functional, []
    for b, img in enumerate(imgs):                                  # (3, H, W) uint8, sizes differ
        if kind == "rrc":
            with torch.random.fork_rng(devices=[]):                 # the caller's RNG stream is untouched
                torch.manual_seed(seeds[b])                         # the draws of T.RandomResizedCrop + flip
                i, j, h, w = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                flip = bool(torch.rand(1) < 0.5)
            img = F.resized_crop(img, i, j, h, w, [size, size], BICUBIC, antialias=True)
            out.append(img.flip(-1) if flip else img)
        else:
            side = size if kind == "center" else eval_resize(size)
            out.append(F.center_crop(F.resize(img, side, BICUBIC, antialias=True), size))
    return torch.stack(out).float().div_(127.5).sub_(1)             # (B, 3, S, S): x/255 normalised (0.5, 0.5)


def _decode_any(raw, name):
    """Any image file torchvision reads -> uint8 (3, H, W). A 16-bit PNG decodes to uint16: keep
    its high byte, as the PIL path does (values 0..65535 would otherwise reach the model)."""
    try:
        img = torchvision.io.decode_image(raw, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as e:
        raise UserError(f"cannot decode image file {name} ({str(e)[:200]}); remove or replace it") from None
    if img.dtype == torch.uint16:
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


# ---- Fashion-MNIST from the original gz files, offline. torchvision (0.29) only checks that the four
# decompressed files exist in <root>/FashionMNIST/raw; download=True would check the *.gz md5s, which
# Debian's re-compressed files fail. So we decompress into a cache in that layout (download=False).
FMNIST_FILES = {"train-images-idx3-ubyte": 2051, "train-labels-idx1-ubyte": 2049,
                "t10k-images-idx3-ubyte": 2051, "t10k-labels-idx1-ubyte": 2049}  # name -> idx magic
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


def cache_dir(*parts):
    """$LDAE_CACHE or ~/.cache/ldae; data folders themselves may be read-only (/usr/share)."""
    root = os.environ.get("LDAE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldae")
    return os.path.join(root, *parts)


def _decompress_idx(src, dst, name):
    """Copy one (gzipped) idx file to dst, checking its magic number first. A broken source is
    blamed on the source (atomic_write reports the other OSErrors as the destination's)."""
    opener = gzip.open if src.endswith(".gz") else open
    try:
        with opener(src, "rb") as f:
            head = f.read(4)
            if int.from_bytes(head, "big") != FMNIST_FILES[name]:
                raise UserError(f"{src} is not an idx file of the expected kind "
                                f"(magic {head.hex()}); re-install the Fashion-MNIST files")
            with open(dst, "wb") as out:
                out.write(head)
                shutil.copyfileobj(f, out)
    except (EOFError, gzip.BadGzipFile, zlib.error, PermissionError) as e:
        raise UserError(f"cannot read {src} ({e}); re-install the Fashion-MNIST files") from None


def _prepare_fashion_mnist(path):
    """-> root that torchvision's FashionMNIST(root, download=False) accepts."""
    if all(os.path.isfile(os.path.join(path, "FashionMNIST", "raw", n)) for n in FMNIST_FILES):
        return path  # already in torchvision's layout
    found = {n: next((c for d in (path, os.path.join(path, "FashionMNIST", "raw")) for ext in ("", ".gz")
                      if os.path.isfile(c := os.path.join(d, n + ext))), None) for n in FMNIST_FILES}
    missing = [n for n, hit in found.items() if hit is None]
    if missing:
        raise UserError(f"Fashion-MNIST files missing in {path}: {', '.join(m + '[.gz]' for m in missing)}; "
                        f"install them with `apt-get install dataset-fashion-mnist` "
                        f"(-> {DEBIAN_FMNIST}) or pass --download")
    root = cache_dir("fashion-mnist", os.path.abspath(path).strip(os.sep).replace(os.sep, "_"))
    raw = os.path.join(root, "FashionMNIST", "raw")
    try:
        os.makedirs(raw, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the Fashion-MNIST cache {raw} ({e.strerror}); set "
                        f"$LDAE_CACHE to a writable folder") from None
    for name, src in found.items():
        dst = os.path.join(raw, name)
        if os.path.isfile(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            continue
        # atomic_write: a temporary name of this process's own, then a rename, so any number of
        # processes (torchrun ranks, parallel jobs) may prepare the same cache at once
        atomic_write(dst, lambda tmp, src=src, name=name: _decompress_idx(src, tmp, name))
    return root


def _build_torchvision(name, args, split, transform):
    cls = {"fashion-mnist": torchvision.datasets.FashionMNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    path = args.data_path
    if args.download:
        root = path or cache_dir(name)
    elif name == "fashion-mnist":
        if path is None and os.path.isdir(DEBIAN_FMNIST):
            path = DEBIAN_FMNIST  # Debian's dataset-fashion-mnist: works offline with no flags
        if path is None:
            raise UserError("--dataset fashion-mnist needs --data-path (a folder with the original "
                            "*-ubyte.gz files, e.g. from `apt-get install dataset-fashion-mnist`) or --download")
        if not os.path.isdir(path):
            raise UserError(f"data path {path} does not exist or is not a folder")
        root = _prepare_fashion_mnist(path)
    else:  # cifar10: a folder holding torchvision's cifar-10-batches-py (or that folder itself)
        if path is None or not os.path.isdir(path):
            raise UserError(f"--dataset cifar10 needs --data-path to an existing folder holding "
                            f"cifar-10-batches-py/ (got {path}), or --download")
        root = path
        if os.path.basename(os.path.normpath(path)) == "cifar-10-batches-py":
            root = os.path.dirname(os.path.normpath(path))
        elif not os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
            # with the tarball there, --download unpacks it offline (torchvision: md5 matches, no network)
            raise UserError(f"{path} has no cifar-10-batches-py/ folder; unpack cifar-10-python.tar.gz "
                            f"there, or put the tarball there and pass --download")
    try:
        ds = cls(root, train=(split == "train"), transform=transform, download=args.download)
    except RuntimeError as e:  # "Dataset not found or corrupted", download failures
        raise UserError(f"{name} could not be loaded from {root}: {e}") from None
    except OSError as e:  # no internet, unwritable root
        raise UserError(f"{name}: {e} (offline? use --data-path with local files)") from None
    return ds, root


def build_dataset(args, split, transform, decode_gpu_ok=False):
    """-> Dataset of (image tensor, int label). Checks paths first; prints a one-line summary.
    decode_gpu_ok: the caller handles --decode gpu items (collate + batch_to_images: pretrain.py)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    name = args.dataset
    if getattr(args, "decode", "pil") == "gpu" and not decode_gpu_ok:
        raise UserError("--decode gpu is only for pretrain.py (this script decodes in its DataLoader "
                        "workers); drop --decode gpu")
    if getattr(args, "decode", "pil") == "gpu" and name != "imagefolder":
        raise UserError(f"--decode gpu decodes JPEG files: use it with --dataset imagefolder, not {name}")
    if name == "synthetic":
        val = getattr(args, "synthetic_val_size", None) or max(1, args.synthetic_size // 4)
        n = args.synthetic_size if split == "train" else val
        # Images are drawn at input_size, so the "center" transform is an identity crop.
        ds = SyntheticShapes(n, args.input_size, seed=getattr(args, "synthetic_seed", 0),
                             stream=0 if split == "train" else 1, transform=transform)
        where = f"generated, seed {ds.seed}"
    elif name == "imagefolder":
        ds, where = _build_imagefolder(args.data_path, split, transform)
        if getattr(args, "decode", "pil") == "gpu":
            ds, where = JpegFolder(ds, transform), where + "; --decode gpu: items are encoded bytes"
    elif name == "packed":
        ds, where = _build_packed(args.data_path, split, transform)
    elif name in ("fashion-mnist", "cifar10"):
        ds, where = _build_torchvision(name, args, split, transform)
    else:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    print(f"[data] {name} {split}: {num_classes(ds)} classes, {len(ds)} images ({where})", flush=True)
    return ds


def classes(dataset):
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):  # torch Subset chains
        dataset = dataset.dataset
    return list(dataset.classes)


def num_classes(dataset):
    return len(classes(dataset))


# ==== CLI: `python data.py pack ...` (write the packed format), `python data.py bench ...` (decoded +
# augmented img/s of each input path; see the module docstring).
@contextlib.contextmanager
def _threads(n):
    """n intra-op threads for a while (on a loaded 2-core box 2 threads made render 200x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _pack_transform(S):
    """The "center" transform's PIL ops kept in uint8: packed at S == --input-size, the center path
    gives tensors bit-identical to the imagefolder path."""
    return T.Compose([ToRGB(), T.Resize(S, interpolation=BICUBIC, antialias=True), T.CenterCrop(S), T.PILToTensor()])


def pack(args):
    if args.dataset == "packed":
        raise UserError("--dataset packed is already packed; pack the imagefolder (or other dataset) it came from")
    args.decode = "pil"
    ds = build_dataset(args, args.split, _pack_transform(args.input_size))
    src = {"dataset": args.dataset, "data_path": os.path.abspath(args.data_path or ""), "split": args.split}
    return pack_dataset(ds, args.out, args.input_size, args.num_workers, args.batch_size, src)


def pack_dataset(ds, out, S, num_workers=0, batch_size=64, source=None):
    """ds items: (uint8 (3, S, S), label). Writes out (.npy memmap) + out.meta.pt, each atomically."""
    from tqdm import tqdm
    folder, N = os.path.dirname(os.path.abspath(out)), len(ds)
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist; create it or pass another --out")
    if N * 3 * S * S > (free := shutil.disk_usage(folder).free):
        raise UserError(f"{out} needs {N * 3 * S * S / 1e9:.1f} GB but {folder} has {free / 1e9:.1f} GB "
                        f"free; pass another --out or a smaller size")
    labels, t0 = torch.empty(N, dtype=torch.int64), time.time()

    def write_images(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(N, 3, S, S))
        i = 0
        # Workers decode in parallel; no shuffling, so batches arrive in order and labels line up.
        with tqdm(total=N, unit="img", desc=f"pack {S}px", dynamic_ncols=True) as bar:
            for x, y in DataLoader(ds, batch_size=batch_size, num_workers=num_workers):
                arr[i:i + len(x)] = x.numpy()                   # (B, 3, S, S) uint8
                labels[i:i + len(x)] = y
                i += len(x)
                bar.update(len(x))
        arr.flush()

    # The meta file goes first and last: a run killed in between leaves no stale pair behind
    # (Packed refuses an image file without its meta file)
    if os.path.exists(out + ".meta.pt"):
        os.remove(out + ".meta.pt")
    atomic_write(out, write_images, N * 3 * S * S)
    save_torch({"version": 1, "shape": [N, 3, S, S], "size": S, "labels": labels,
                "classes": classes(ds), "source": source or {}}, out + ".meta.pt")
    print(f"[pack] {N} images -> {out} ({N * 3 * S * S / 1e9:.2f} GB, {N / (time.time() - t0):.0f} img/s)")
    return out


def write_jpeg_folder(root, n, size=(500, 375), quality=90, seed=0):
    """n SyntheticShapes JPEGs in root/<class>/ at ImageNet-typical size and quality (bench, tests):
    drawn at the long side, cropped, plus noise (sd 8) so they do not compress trivially (~70 KB)."""
    from PIL import Image
    (W, H), L = size, max(size)
    ds, g = SyntheticShapes(n, L, seed=seed), torch.Generator().manual_seed(seed)
    with _threads(1):
        for i in range(n):
            img, y = ds.render(i)                                     # (3, L, L) uint8
            img = img[:, (L - H) // 2:(L - H) // 2 + H, (L - W) // 2:(L - W) // 2 + W].float()
            img = (img + 8 * torch.randn(img.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
            os.makedirs(os.path.join(root, SYNTHETIC_CLASSES[y]), exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(
                os.path.join(root, SYNTHETIC_CLASSES[y], f"{i:05d}.jpg"), quality=quality)
    return root


def _decode_on_cpu(batch):
    return batch_to_images(collate(batch)[0], "cpu")


def bench(args):
    """Decoded + augmented img/s of each input path on this machine's CPU."""
    if args.make and not os.path.isdir(args.data_path):
        print(f"[bench] writing {args.make} synthetic JPEGs to {args.data_path}", flush=True)
        write_jpeg_folder(args.data_path, args.make)
    S, n, B, P, rows = args.input_size, args.images, args.batch_size, args.pack_size, []
    workers = [int(w) for w in args.workers.split(",")]
    fargs = argparse.Namespace(dataset="imagefolder", data_path=args.data_path, decode="pil")
    folder = lambda tf: (lambda ds: Subset(ds, range(min(n, len(ds)))))(build_dataset(fargs, "train", tf))  # noqa: E731

    def cpu_seconds():   # this process + its reaped children (DataLoader workers are joined at the end)
        return sum(sum(resource.getrusage(w)[:2]) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    def run(name, ds, w, collate_fn=None):
        next(iter(DataLoader(Subset(ds, range(B)), batch_size=B, collate_fn=collate_fn)))  # warm caches
        with _threads(1) if w == 0 else contextlib.nullcontext():     # w = 0: the main process, 1 core
            t, c, ts = time.perf_counter(), cpu_seconds(), []
            for _ in DataLoader(ds, batch_size=B, num_workers=w, collate_fn=collate_fn):
                ts.append(time.perf_counter() - t)
            cpu = cpu_seconds() - c
        # Wall img/s in steady state: skip worker start-up and the 2*w batches prefetched meanwhile. img per
        # CPU-second (all processes, IPC included) does not depend on our share of the shared cores.
        k = max(0, min(2 * w, len(ts) - 2))
        rate = B * (len(ts) - 1 - k) / (ts[-1] - ts[k]) if len(ts) > 1 else len(ds) / ts[-1]
        rows.append((name, w, rate, len(ds) / cpu, os.getloadavg()[0]))
        print(f"  {name:<48} {w} workers: {rate:7.1f} img/s, {rows[-1][3]:6.1f} img per CPU-second "
              f"(load avg {rows[-1][-1]:.2f})", flush=True)

    print(f"[bench] {args.data_path}, first {n} images, {S}px, batch {B}, load avg {os.getloadavg()[0]:.2f}")
    run("PIL decode only (RGB)", folder(T.PILToTensor()), 0, len)
    for w in workers:
        run("PIL decode + rrc + flip + ToTensor + Normalize", folder(build_transform("rrc", S)), w)
    out = os.path.join(args.pack_dir, f"bench_{P}.u8")
    pack_dataset(folder(_pack_transform(P)), out, P, max(workers))
    for w in workers:
        run(f"packed {P}px + rrc + flip + Normalize", Packed(out, build_transform("rrc", S)), w)
    # uint8 out of the workers (4x fewer bytes through shared memory, float on the GPU): the float IPC cost
    u8 = T.Compose(build_transform("rrc", S).transforms[:3])
    run(f"packed {P}px + rrc + flip, uint8 out", Packed(out, u8), max(workers))
    raw = JpegFolder(folder(build_transform("rrc", S)), build_transform("rrc", S))
    run("read JPEG bytes only (--decode gpu workers)", raw, 0, len)
    run("decode_batch on CPU (read + decode_jpeg + rrc + flip)", raw, 0, _decode_on_cpu)
    print(f"\n| path | workers | img/s (wall) | img per CPU-second | cores per GPU at {args.target:.0f} img/s "
          f"| load avg |\n|---|---|---|---|---|---|")
    for name, w, rate, per, load in rows:
        print(f"| {name} | {w} | {rate:.0f} | {per:.0f} | {args.target / per:.1f} | {load:.2f} |")
    os.remove(out)
    os.remove(out + ".meta.pt")
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description="Pack a dataset into the uint8 format, or benchmark the input "
                                "paths (see the module docstring for the commands).")
    sub = p.add_subparsers(dest="command", required=True)
    pk = add_data_args(sub.add_parser("pack", help="decode + resize + center-crop every image once into FILE"))
    pk.add_argument("--split", default="train", choices=["train", "val"])
    pk.add_argument("--out", required=True, help="the packed file (.npy memmap) to write; FILE.meta.pt beside it")
    pk.add_argument("--batch-size", type=int, default=64)
    b = sub.add_parser("bench", help="img/s of the PIL, packed and decode_batch paths on a JPEG folder")
    b.add_argument("--data-path", required=True, help="a folder of class folders of JPEGs")
    b.add_argument("--make", type=int, default=0, help="first write this many synthetic JPEGs if the folder is absent")
    b.add_argument("--input-size", type=int, default=256)
    b.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    b.add_argument("--images", type=int, default=512, help="images timed per row")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--pack-size", type=int, default=288, help="stored size for the packed row")
    b.add_argument("--pack-dir", default="/tmp", help="where the packed row's temporary file goes")
    b.add_argument("--target", type=float, default=1790, help="img/s one GPU consumes (vit_b, H100, 50%% MFU)")
    return p


def main(args):
    return pack(args) if args.command == "pack" else bench(args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
