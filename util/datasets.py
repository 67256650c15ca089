"""The data sets every script reads, behind one entry point (build_dataset), and the data flags
they share. `--dataset` / `--data-path` mean the same in tokenizer_pca.py, pretrain.py,
linprobe.py and distill.py:
  synthetic     procedurally drawn shapes (default; offline, deterministic, 10 classes)
  imagefolder   ImageNet layout: --data-path root/ with class folders, or root/train + root/val
  fashion-mnist torchvision's FashionMNIST, offline from a folder of the original gz files, e.g.
                Debian's `apt-get install dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
  cifar10       torchvision's CIFAR10 (--download, or a folder holding cifar-10-batches-py)
  packed        a uint8 file written once by tools/pack_data.py: no JPEG decoding in training
A DiT on a tokenizer's latents reads them with LatentFile instead (--latents-file).
Contract: images are float (3, H, W) in [-1, 1] (DiT normalisation, RECIPE s2), grayscale
repeated to 3 channels. docs/USAGE.md, "Data", has the commands and the input benchmark.
"""
import collections
import functools
import gzip
import hashlib
import os
import zlib

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, Subset

from util import decode, files, synthetic
from util.cli import SEED, UserError, bounded, check_memory


DATASETS = ("synthetic", "imagefolder", "fashion-mnist", "cifar10", "packed")


# ---- The data flags every script shares.
def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="synthetic", choices=DATASETS,
                       help="synthetic needs no files; the others read --data-path")
    group.add_argument("--data-path", default=None,
                       help="imagefolder: root/ (class folders) or root/{train,val}; "
                            "fashion-mnist: folder of *-ubyte(.gz) files; cifar10: folder with "
                            "cifar-10-batches-py; packed: the file of tools/pack_data.py "
                            "({split} -> train/val)")
    group.add_argument("--decode", default="pil", choices=["pil", "gpu"],
                       help="imagefolder: pil = decode + augment in DataLoader workers; "
                            "gpu (pretrain.py) = on the training device")
    group.add_argument("--download", action="store_true",
                       help="fashion-mnist/cifar10: let torchvision download into --data-path "
                            "(needs internet)")
    # 4096: 16x the paper's side; one float image is already 200 MB there
    group.add_argument("--input-size", type=bounded(int, 1, 4096), default=256,
                       help="image side in pixels (paper: 256)")
    group.add_argument("--num-workers", type=bounded(int, 0), default=min(4, os.cpu_count() or 1),
                       help="DataLoader worker processes (0: load in the main process)")
    group.add_argument("--synthetic-size", type=bounded(int, 1), default=2000,
                       help="synthetic: train images")
    group.add_argument("--synthetic-val-size", type=bounded(int, 1), default=None,
                       help="synthetic: val images (default: 1/4 of --synthetic-size)")
    group.add_argument("--synthetic-seed", type=SEED, default=0,
                       help="synthetic: seed (train/val: other streams)")
    return parser


# ---- ImageFolder: checks up front, and a loader that names the bad file.
def _checked_loader(path):
    """PIL loader: a decoding failure becomes a UserError naming the file (checked lazily:
    checking every file up front would cost a full pass over ImageNet)."""
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


def _require_folder(path):
    if not os.path.isdir(path):
        raise UserError(f"data path {path} does not exist or is not a folder")


def _build_imagefolder(path, split, transform):
    if not path:
        raise UserError("--dataset imagefolder needs --data-path (a folder of class folders, "
                        "or one with train/ and val/)")
    _require_folder(path)
    if not os.listdir(path):
        raise UserError(f"data path {path} is empty; expected class folders or train/ and val/")
    has_splits = os.path.isdir(os.path.join(path, "train"))
    root = os.path.join(path, split) if has_splits else path
    if has_splits and not os.path.isdir(root):
        raise UserError(f"{path} has train/ but no {split}/ folder; add {root} or use a flat root")
    class_dirs = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    if not class_dirs:
        raise UserError(f"{root} has no class sub-folders; put images in {root}/<class>/")
    skipped = []

    def regular_image(path):                    # a FIFO named x.jpg would hang the loader
        if not path.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS):
            return False
        if not os.path.isfile(path):            # a FIFO, a device, a dangling link
            skipped.append(os.path.relpath(path, root))
        return os.path.isfile(path)
    ds = torchvision.datasets.ImageFolder(root, transform=transform, loader=_checked_loader,
                                          is_valid_file=regular_image, allow_empty=True)
    if skipped:
        print(f"[data] skipped {len(skipped)} entries of {root} named like images that are not "
              f"regular files: {', '.join(skipped[:4])}", flush=True)
    if len(ds) == 0:
        extensions = ", ".join(torchvision.datasets.folder.IMG_EXTENSIONS)
        raise UserError(f"no images found in the class folders of {root} "
                        f"(extensions {extensions})")
    empty = sorted(set(ds.classes) - {ds.classes[y] for y in ds.targets})
    if empty:
        # the class keeps its index (so train and val agree), but no image teaches it: a probe
        # head would have an output that never trains
        print(f"[data] warning: {len(empty)} class folder(s) of {root} hold no images: "
              f"{', '.join(empty[:10])}; add images or remove the folder(s)", flush=True)
    if has_splits:
        return ds, root
    where = f"{root} (flat root: every 10th image per class is val)"
    return Subset(ds, _holdout(ds.targets, split)), where


def _holdout(labels, split):
    """One flat folder / packed file serves both splits: every 10th image per class is val, so
    the probe is never scored on its own training images. -> indices of `split`."""
    seen, keep = collections.Counter(), []
    for index, label in enumerate(labels):
        if (seen[int(label)] % 10 == 0) == (split == "val"):
            keep.append(index)
        seen[int(label)] += 1
    return keep


# ---- Packed format (written by `python tools/pack_data.py pack`): FILE = .npy uint8
# (N, 3, S, S), each image decoded once, shorter side to S and center-cropped (the "center"
# transform's PIL ops); FILE.meta.pt = {"version", "shape", "size", "labels" (N,) int64,
# "classes", "source"}. Channels-first: an item is a zero-copy view.
PACK_CMD = ("python tools/pack_data.py pack --dataset imagefolder --data-path DIR --split "
            "train --input-size 288 --out")


def pack_fingerprint(path):
    """The image file's size and its first and last MiB, hashed: the meta file names the image
    file it was written with (a copied pack keeps it; a repack killed between the two files
    shows)."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return digest.hexdigest()


def _check_packed(path, meta, images):
    """UserError unless the image file and its meta file describe the same packed images."""
    fields = {"labels": torch.Tensor, "classes": (list, tuple), "shape": list}
    meta_ok = files.field_problem(meta, fields) is None and meta.get("version") == 1
    shape_ok = (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1] == 3
                and images.shape[2] == images.shape[3])
    agree = meta_ok and list(images.shape) == meta.get("shape")
    agree = agree and len(meta.get("labels", ())) == len(images)
    if not (shape_ok and agree):
        meta_shape = meta.get("shape") if isinstance(meta, dict) else "?"
        raise UserError(f"{path} (shape {tuple(images.shape)}, {images.dtype}) does not match "
                        f"{path}.meta.pt (shape {meta_shape}); re-write both with "
                        f"`{PACK_CMD} {path}`")
    if meta.get("fingerprint") != pack_fingerprint(path):
        raise UserError(f"{path}.meta.pt was written for another {path} (a repack stopped "
                        f"between the two files?); re-write both with `{PACK_CMD} {path}`")


class Packed(Dataset):
    def __init__(self, path, transform=None):
        meta_path = path + ".meta.pt"
        if not os.path.isfile(path):
            raise UserError(f"packed file {path} does not exist; write it once with "
                            f"`{PACK_CMD} {path}`")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} (labels, classes) is missing, so {path} was not "
                            f"written to the end; re-run `{PACK_CMD} {path}`")
        meta = files.load_torch(meta_path, "packed meta file",
                                f"re-write it with `{PACK_CMD} {path}`")
        try:
            images = np.load(path, mmap_mode="r")                # reads the header only
        except Exception as e:
            raise UserError(f"{path} is not a packed uint8 file ({type(e).__name__}: "
                            f"{str(e)[:200]}); re-write it with `{PACK_CMD} {path}`") from None
        _check_packed(path, meta, images)
        self.path, self.transform, self.size = path, transform, images.shape[2]
        self.labels, self.classes = meta["labels"].tolist(), list(meta["classes"])
        self._images = None

    def __getstate__(self):
        # a memmap pickles as a full in-memory copy: re-open it in each worker instead
        return {**self.__dict__, "_images": None}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self._images is None:
            # "c" = copy-on-write: writable for torch.from_numpy, never written back
            self._images = np.load(self.path, mmap_mode="c")
        x = torch.from_numpy(self._images[i])               # (3, S, S) uint8, pages of the file
        if self.transform is None:
            return x, self.labels[i]
        return self.transform(x), self.labels[i]


def _build_packed(path, split, transform):
    if not path:
        raise UserError(f"--dataset packed needs --data-path FILE, written once by "
                        f"`{PACK_CMD} FILE`")
    ds = Packed(path.replace("{split}", split), transform)
    want = getattr(transform, "size", 0)
    if ds.size < want:
        raise UserError(f"{ds.path} holds {ds.size}x{ds.size} images, smaller than --input-size "
                        f"{want}; re-pack at --input-size {want} (center) or 288-320 (rrc)")
    if getattr(transform, "kind", None) == "center" and ds.size != want:
        print(f"[data] note: {ds.path} is {ds.size}px; center crops at {want}px resize a second "
              f"time (pack at --input-size {want} for the exact DiT ablation input)")
    if "{split}" in path:
        return ds, ds.path
    where = f"{ds.path} (one file: every 10th image per class is val)"
    return Subset(ds, _holdout(ds.labels, split)), where


# ---- Fashion-MNIST, offline, straight from its four idx files: gzipped as Debian's
# dataset-fashion-mnist ships them (whose re-compressed files fail torchvision's checksums), or as
# torchvision's --download leaves them. Nothing is written; the items are torchvision's.
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_MAGIC = {"images": 2051, "labels": 2049}    # uint8 data, then 3 or 1 dimensions
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(folder, name, magic):
    """The uint8 array of idx file `name` (or name.gz) in folder or folder/FashionMNIST/raw."""
    places = [folder, os.path.join(folder, "FashionMNIST", "raw")]
    found = [os.path.join(p, name + ext) for p in places for ext in ("", ".gz")
             if os.path.isfile(os.path.join(p, name + ext))]
    if not found:
        raise UserError(f"Fashion-MNIST file {name}[.gz] is missing in {folder}; install the "
                        f"files with `apt-get install dataset-fashion-mnist` (-> {DEBIAN_FMNIST}) "
                        f"or pass --download")
    path, dims = found[0], magic & 0xFF
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({e}); re-install the Fashion-MNIST files") from None
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if int.from_bytes(data[:4], "big") != magic or len(data) != 4 + 4 * dims + np.prod(shape):
        raise UserError(f"{path} is not a whole idx file of the expected kind (magic "
                        f"{data[:4].hex()}, {len(data)} bytes); re-install the Fashion-MNIST files")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class FashionMNIST(Dataset):
    """Items: (transform(28 x 28 grayscale PIL image), label), as torchvision's FashionMNIST."""
    classes = torchvision.datasets.FashionMNIST.classes

    def __init__(self, folder, split, transform=None):
        images, labels = FMNIST_FILES[split]
        self.images = read_idx(folder, images, IDX_MAGIC["images"])
        self.labels = read_idx(folder, labels, IDX_MAGIC["labels"])
        if len(self.images) != len(self.labels):
            raise UserError(f"{folder}: {len(self.images)} {split} images but {len(self.labels)} "
                            f"labels; re-install the Fashion-MNIST files")
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _build_fashion_mnist(args, split, transform):
    folder = args.data_path
    if folder is None and os.path.isdir(DEBIAN_FMNIST) and not args.download:
        folder = DEBIAN_FMNIST                  # Debian's dataset-fashion-mnist: no flags needed
    if args.download:                           # torchvision fetches the gz files (internet)
        folder = folder or os.path.join(os.path.expanduser("~"), ".cache", "ldae")
        _torchvision_download(torchvision.datasets.FashionMNIST, folder)
    if folder is None:
        raise UserError("--dataset fashion-mnist needs --data-path (a folder with the original "
                        "*-ubyte.gz files, e.g. from `apt-get install dataset-fashion-mnist`) "
                        "or --download")
    _require_folder(folder)
    return FashionMNIST(folder, split, transform), folder


def _torchvision_download(kind, root):
    try:
        kind(root, download=True)
    except (RuntimeError, OSError) as e:       # no internet, an unwritable root, a bad checksum
        raise UserError(f"{kind.__name__} could not be downloaded into {root}: {e} (offline? "
                        f"use --data-path with local files)") from None


def _build_cifar10(args, split, transform):
    """torchvision's CIFAR10 from a folder holding cifar-10-batches-py (or that folder)."""
    root = args.data_path
    if args.download:
        root = root or os.path.join(os.path.expanduser("~"), ".cache", "ldae")
        _torchvision_download(torchvision.datasets.CIFAR10, root)
    if root is None or not os.path.isdir(root):
        raise UserError(f"--dataset cifar10 needs --data-path to an existing folder holding "
                        f"cifar-10-batches-py/ (got {root}), or --download")
    if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py":
        root = os.path.dirname(os.path.normpath(root))
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        # with the tarball there, --download unpacks it offline (its md5 matches, no network)
        raise UserError(f"{root} has no cifar-10-batches-py/ folder; unpack "
                        f"cifar-10-python.tar.gz there, or put the tarball there and pass "
                        f"--download")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=split == "train", transform=transform)
    except RuntimeError as e:                  # "Dataset not found or corrupted"
        raise UserError(f"cifar10 could not be loaded from {root}: {e}") from None
    return ds, root


# ---- One entry point for every dataset.
def _build_synthetic(args, split, transform):
    if split == "train":
        size = args.synthetic_size
    else:
        size = getattr(args, "synthetic_val_size", None) or max(1, args.synthetic_size // 4)
    # the one per-image cost: a shuffled order (the sampler's int64 permutation, and its list)
    check_memory(16 * size, f"--synthetic-size {size}", "pass a smaller size")
    # Images are drawn at input_size, so the "center" transform is an identity crop.
    ds = synthetic.SyntheticShapes(size, args.input_size, seed=getattr(args, "synthetic_seed", 0),
                                   stream=0 if split == "train" else 1, transform=transform)
    return ds, f"generated, seed {ds.seed}"


def build_dataset(args, split, transform, decode_gpu_ok=False):
    """-> Dataset of (image tensor, int label), paths checked first, a one-line summary printed.
    decode_gpu_ok: the caller decodes --decode gpu items itself (pretrain.py)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    name = args.dataset
    decode_gpu = getattr(args, "decode", "pil") == "gpu"
    if decode_gpu and not decode_gpu_ok:
        raise UserError("--decode gpu is only for pretrain.py (this script decodes in its "
                        "DataLoader workers); drop --decode gpu")
    if decode_gpu and name != "imagefolder":
        raise UserError(f"--decode gpu decodes JPEG files: use it with --dataset imagefolder, "
                        f"not {name}")
    if name == "synthetic":
        ds, where = _build_synthetic(args, split, transform)
    elif name == "imagefolder":
        ds, where = _build_imagefolder(args.data_path, split, transform)
        if decode_gpu:
            ds = decode.JpegFolder(ds, transform)
            where += "; --decode gpu: items are encoded bytes"
    elif name == "packed":
        ds, where = _build_packed(args.data_path, split, transform)
    elif name == "fashion-mnist":
        ds, where = _build_fashion_mnist(args, split, transform)
    elif name == "cifar10":
        ds, where = _build_cifar10(args, split, transform)
    else:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    print(f"[data] {name} {split}: {num_classes(ds)} classes, {len(ds)} images ({where})",
          flush=True)
    return ds


def identity(dataset):
    """What says two runs read the same data: the item count and a fingerprint (the names, sizes
    and labels of an image folder's files; else the stored arrays) -> dict, or None for the
    generated synthetic set (its flags fix it)."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    digest = hashlib.sha1()
    if hasattr(base, "samples"):                # an image folder, or its --decode gpu view
        for path, label in base.samples:
            digest.update(f"{path}\0{os.path.getsize(path)}\0{label}\n".encode())
    elif isinstance(base, (FashionMNIST, LatentFile)):
        digest.update(np.asarray(base.labels).tobytes())
        digest.update(str(tuple(getattr(base, "images", base.labels).shape)).encode())
    elif isinstance(base, Packed):
        digest.update(f"{os.path.getsize(base.path)} {base.labels}".encode())
    elif hasattr(base, "targets"):              # CIFAR-10
        digest.update(np.asarray(base.targets).tobytes() + base.data.tobytes())
    else:
        return None
    return {"items": len(dataset), "fingerprint": digest.hexdigest()[:16]}


def classes(dataset):
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):  # torch Subset chains
        dataset = dataset.dataset
    return list(dataset.classes)


def num_classes(dataset):
    return len(classes(dataset))


# ---- A tokenizer's latents, for a DiT that reads them (--latents-file): a .pt file
# {"latents": (N, C, h, w) float, "labels": (N,) long, optional "classes": names}. Mapped, not
# read: a 1.28M x 4 x 32 x 32 fp16 file is 10 GB.
class LatentFile(Dataset):
    """Items: (latent (C, h, w) float32, int label)."""

    def __init__(self, path):
        if not path:
            raise UserError("this model reads precomputed latents: pass --latents-file FILE.pt "
                            "holding {'latents': (N, C, h, w), 'labels': (N,)}")
        saved = files.load_torch(path, "latents file", "pass a .pt file of tensors written with "
                                 "torch.save({'latents': ..., 'labels': ...})", mmap=True)
        problem = files.field_problem(saved, {"latents": torch.Tensor, "labels": torch.Tensor},
                                      {"classes": (list, tuple)})
        if problem is None and not saved["latents"].is_floating_point():
            problem = f"its latents are {saved['latents'].dtype}, not floating point"
        if problem:
            raise UserError(f"{path} is not a latents file ({problem}); it must hold "
                            f"{{'latents': float (N, C, h, w), 'labels': (N,)}}")
        self.latents, self.labels = saved["latents"], saved["labels"].long()
        if self.latents.ndim != 4 or len(self.labels) != len(self.latents):
            raise UserError(f"{path}: latents must be (N, C, h, w) with N labels, got "
                            f"{tuple(self.latents.shape)} and {tuple(self.labels.shape)}")
        if self.latents.shape[2] != self.latents.shape[3]:
            raise UserError(f"{path}: latents must be square, got {tuple(self.latents.shape[2:])}")
        num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = list(saved.get("classes") or map(str, range(num_classes)))

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i].float(), int(self.labels[i])


@functools.lru_cache(maxsize=None)
def open_latents(path):
    """The LatentFile of `path`, opened once per process (the model's build reads its shape and
    class count, the training run its items)."""
    ds = LatentFile(path)
    print(f"[data] latents {path}: {len(ds.classes)} classes, {len(ds)} latents of "
          f"{tuple(ds.latents.shape[1:])}", flush=True)
    return ds
