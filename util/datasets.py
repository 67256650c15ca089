"""The data sets every script reads (build_dataset; docs/USAGE.md "Data") and their shared flags."""
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


def add_data_args(parser):
    add = parser.add_argument_group("data").add_argument
    add("--dataset", default="synthetic", choices=DATASETS,
        help="synthetic needs no files; the others read --data-path")
    add("--data-path", help="imagefolder: root/ (class folders) or root/{train,val}; "
        "fashion-mnist: folder of *-ubyte(.gz) files; cifar10: folder with cifar-10-batches-py; "
        "packed: the file of tools/pack_data.py ({split} -> train/val)")
    add("--decode", default="pil", choices=["pil", "gpu"], help="imagefolder: pil = decode + "
        "augment in DataLoader workers; gpu (pretrain.py) = on the training device")
    add("--download", action="store_true",
        help="fashion-mnist/cifar10: let torchvision download into --data-path (needs internet)")
    # 4096: 16x the paper's side; one float image is already 200 MB there
    add("--input-size", type=bounded(int, 1, 4096), default=256,
        help="image side in pixels (paper: 256)")
    add("--num-workers", type=bounded(int, 0), default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes (0: load in the main process)")
    add("--synthetic-size", type=bounded(int, 1), default=2000, help="synthetic: train images")
    add("--synthetic-val-size", type=bounded(int, 1),
        help="synthetic: val images (default: 1/4 of --synthetic-size)")
    add("--synthetic-seed", type=SEED, default=0, help="synthetic: seed (train/val: other streams)")
    return parser


def _checked_loader(path):
    """PIL loader; a broken file is a UserError naming it (lazily: up front is an ImageNet pass)."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                # 16-bit gray: convert("RGB") clips to white; keep the high byte (PIL's RGB16 way)
                high = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(high)
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise UserError(f"cannot read image file {path} ({type(e).__name__}: {e}); "
                        "remove or replace it") from None


def _require_folder(path):
    if not os.path.isdir(path):
        raise UserError(f"data path {path} does not exist or is not a folder")


def _build_imagefolder(args, split, transform):
    path = args.data_path
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
    if not any(os.path.isdir(os.path.join(root, d)) for d in os.listdir(root)):
        raise UserError(f"{root} has no class sub-folders; put images in {root}/<class>/")
    skipped = []

    def regular_image(path):                    # a FIFO named x.jpg would hang the loader
        named = path.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)
        if named and not os.path.isfile(path):  # a FIFO, a device, a dangling link
            skipped.append(os.path.relpath(path, root))
        return named and os.path.isfile(path)
    ds = torchvision.datasets.ImageFolder(root, transform=transform, loader=_checked_loader,
                                          is_valid_file=regular_image, allow_empty=True)
    if skipped:
        print(f"[data] skipped {len(skipped)} entries of {root} named like images that are not "
              f"regular files: {', '.join(skipped[:4])}", flush=True)
    if len(ds) == 0:
        raise UserError(f"no images found in the class folders of {root} (extensions "
                        f"{', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)})")
    empty = sorted(set(ds.classes) - {ds.classes[y] for y in ds.targets})
    if empty:
        # the class keeps its index (train and val agree), but a probe's output for it never trains
        print(f"[data] warning: {len(empty)} class folder(s) of {root} hold no images: "
              f"{', '.join(empty[:10])}; add images or remove the folder(s)", flush=True)
    if has_splits:
        return ds, root
    return _holdout(ds, ds.targets, split, root, "flat root")


def _holdout(ds, labels, split, name, kind):
    """One set serving both splits: every 10th image per class is val, never trained on."""
    seen, keep = collections.Counter(), []
    for index, label in enumerate(labels):
        if (seen[int(label)] % 10 == 0) == (split == "val"):
            keep.append(index)
        seen[int(label)] += 1
    return Subset(ds, keep), f"{name} ({kind}: every 10th image per class is val)"


# ---- Packed: FILE (tools/pack_data.py) = .npy uint8 (N, 3, S, S), decoded once by the "center"
# transform's PIL ops; FILE.meta.pt = {version, shape, size, labels, classes, source, fingerprint}.
PACK_CMD = ("python tools/pack_data.py pack --dataset imagefolder --data-path DIR --split "
            "train --input-size 288 --out")


def pack_fingerprint(path):
    """Size + first and last MiB, hashed: meta names its image file (a half-done repack shows)."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return digest.hexdigest()


def _check_packed(path, meta, images):
    fields = {"labels": torch.Tensor, "classes": (list, tuple), "shape": list}
    agree = files.field_problem(meta, fields) is None and meta.get("version") == 1
    agree = agree and meta["shape"] == list(images.shape) and len(meta["labels"]) == len(images)
    square = images.ndim == 4 and images.shape[1] == 3 and images.shape[2] == images.shape[3]
    if not (images.dtype == np.uint8 and square and agree):
        shape = meta.get("shape") if isinstance(meta, dict) else "?"
        raise UserError(f"{path} (shape {tuple(images.shape)}, {images.dtype}) does not match "
                        f"{path}.meta.pt (shape {shape}); re-write both with `{PACK_CMD} {path}`")
    if meta.get("fingerprint") != pack_fingerprint(path):
        raise UserError(f"{path}.meta.pt was written for another {path} (a repack stopped "
                        f"between the two files?); re-write both with `{PACK_CMD} {path}`")


class Packed(Dataset):
    def __init__(self, path, transform=None):
        meta_path, redo = path + ".meta.pt", f"`{PACK_CMD} {path}`"
        if not os.path.isfile(path):
            raise UserError(f"packed file {path} does not exist; write it once with {redo}")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} (labels, classes) is missing, so {path} was not "
                            f"written to the end; re-run {redo}")
        meta = files.load_torch(meta_path, "packed meta file", f"re-write it with {redo}")
        try:
            images = np.load(path, mmap_mode="r")                # reads the header only
        except Exception as e:
            raise UserError(f"{path} is not a packed uint8 file ({type(e).__name__}: "
                            f"{str(e)[:200]}); re-write it with {redo}") from None
        _check_packed(path, meta, images)
        self.path, self.transform, self.size = path, transform, images.shape[2]
        self.labels, self.classes = meta["labels"].tolist(), list(meta["classes"])
        self._images = None

    def __getstate__(self):
        return {**self.__dict__, "_images": None}   # a memmap would pickle as a full copy

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self._images is None:
            # "c" = copy-on-write: writable for torch.from_numpy, never written back
            self._images = np.load(self.path, mmap_mode="c")
        x = torch.from_numpy(self._images[i])               # (3, S, S) uint8, pages of the file
        return (x if self.transform is None else self.transform(x)), self.labels[i]


def _build_packed(args, split, transform):
    path = args.data_path
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
    return _holdout(ds, ds.labels, split, ds.path, "one file")


# ---- Fashion-MNIST from its idx files, gzipped or not (Debian's fail torchvision's checksums)
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
        folder = _torchvision_download(torchvision.datasets.FashionMNIST, folder)
    if folder is None:
        raise UserError("--dataset fashion-mnist needs --data-path (a folder with the original "
                        "*-ubyte.gz files, e.g. from `apt-get install dataset-fashion-mnist`) "
                        "or --download")
    _require_folder(folder)
    return FashionMNIST(folder, split, transform), folder


def _torchvision_download(kind, root):
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "ldae")
    try:
        kind(root, download=True)
    except (RuntimeError, OSError) as e:       # no internet, an unwritable root, a bad checksum
        raise UserError(f"{kind.__name__} could not be downloaded into {root}: {e} (offline? "
                        f"use --data-path with local files)") from None
    return root


def _build_cifar10(args, split, transform):
    root = args.data_path
    if args.download:
        root = _torchvision_download(torchvision.datasets.CIFAR10, root)
    if root is None or not os.path.isdir(root):
        raise UserError(f"--dataset cifar10 needs --data-path to an existing folder holding "
                        f"cifar-10-batches-py/ (got {root}), or --download")
    if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py":
        root = os.path.dirname(os.path.normpath(root))
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        # with the tarball there, --download unpacks it offline (its md5 matches, no network)
        raise UserError(f"{root} has no cifar-10-batches-py/ folder; unpack cifar-10-python.tar.gz "
                        f"there, or put the tarball there and pass --download")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=split == "train", transform=transform)
    except RuntimeError as e:                  # "Dataset not found or corrupted"
        raise UserError(f"cifar10 could not be loaded from {root}: {e}") from None
    return ds, root


def _build_synthetic(args, split, transform):
    size = args.synthetic_size
    if split == "val":
        size = getattr(args, "synthetic_val_size", None) or max(1, size // 4)
    # the one per-image cost: a shuffled order (the sampler's int64 permutation, and its list)
    check_memory(16 * size, f"--synthetic-size {size}", "pass a smaller size")
    # Images are drawn at input_size, so the "center" transform is an identity crop.
    ds = synthetic.SyntheticShapes(size, args.input_size, seed=getattr(args, "synthetic_seed", 0),
                                   stream=0 if split == "train" else 1, transform=transform)
    return ds, f"generated, seed {ds.seed}"


DATASETS = {"synthetic": _build_synthetic, "imagefolder": _build_imagefolder,   # --dataset choices
            "fashion-mnist": _build_fashion_mnist, "cifar10": _build_cifar10,
            "packed": _build_packed}


def build_dataset(args, split, transform, decode_gpu_ok=False):
    """-> (image, int label) items, paths checked, a summary printed; decode_gpu_ok: pretrain.py."""
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
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    ds, where = DATASETS[name](args, split, transform)
    if decode_gpu:                              # imagefolder only (checked above)
        ds = decode.JpegFolder(ds, transform)
        where += "; --decode gpu: items are encoded bytes"
    print(f"[data] {name} {split}: {num_classes(ds)} classes, {len(ds)} images ({where})",
          flush=True)
    return ds


def identity(dataset):
    """{"items", "fingerprint"}: equal iff runs read the same data; synthetic: None (its flags)."""
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


class LatentFile(Dataset):
    """A tokenizer's latents for a DiT (--latents-file): {"latents": (N, C, h, w) float, "labels":
    (N,), "classes" optional}, mapped (1.28M x 4 x 32 x 32 fp16 is 10 GB); items (latent, label)."""

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
    """LatentFile(path), opened once per process (read by the model's build and by the training)."""
    ds = LatentFile(path)
    print(f"[data] latents {path}: {len(ds.classes)} classes, {len(ds)} latents of "
          f"{tuple(ds.latents.shape[1:])}", flush=True)
    return ds
