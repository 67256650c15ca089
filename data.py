"""Datasets, transforms and the CLI error convention shared by every l-DAE script.

Every script (tokenizer_pca.py, pretrain.py, linprobe.py) gets its data from here, so that
`--dataset` / `--data-path` mean the same thing everywhere. Datasets:

  synthetic     procedurally drawn shapes/textures (default; offline, deterministic, 10 classes)
  imagefolder   ImageNet layout: --data-path root/ with class folders, or root/train + root/val
  fashion-mnist torchvision's FashionMNIST; offline from a folder of the original gz files, e.g.
                Debian's `apt-get install dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist
  cifar10       torchvision's CIFAR10 (--download, or a folder holding cifar-10-batches-py)

Examples (through any script that calls add_data_args):
  python tokenizer_pca.py --dataset synthetic --input-size 32 --patch-size 4 --out /tmp/pca.pt
  python tokenizer_pca.py --dataset fashion-mnist --data-path /usr/share/datasets/fashion-mnist \
      --input-size 32 --patch-size 4 --out /tmp/pca_fm.pt
  python tokenizer_pca.py --dataset imagefolder --data-path /data/imagenet --out /tmp/pca_in.pt

Convention (contract): images are float (3, H, W) in [-1, 1] (DiT normalisation, RECIPE s2);
grayscale is repeated to 3 channels. Bad user input raises UserError; run_cli turns it into
`error: <msg>` on stderr and exit status 2, without a traceback.
"""
import gzip
import math
import os
import shutil
import sys

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import transforms as T

DATASETS = ("synthetic", "imagefolder", "fashion-mnist", "cifar10")


class UserError(Exception):
    """A problem the user can fix (bad path, missing files, bad flag): printed without traceback.

    DataLoader workers ship exceptions back to the main process by re-building them as
    `type(msg)` where msg is "Caught UserError in DataLoader worker process 0.\\nOriginal
    Traceback ... data.UserError: <our message>" (torch/_utils.py ExceptionWrapper.reraise).
    We recover the original one-line message here, so `run_cli` shows the same clean error
    whether the image was decoded in the main process or in a worker.
    """

    def __init__(self, msg=""):
        msg = str(msg)
        if "Original Traceback" in msg and "UserError: " in msg:
            msg = msg.rsplit("UserError: ", 1)[1].strip()
        super().__init__(msg)


def run_cli(main, parser, argv=None):
    """Parse argv, run main(args); a UserError becomes `error: msg` + exit 2 (house rule)."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="synthetic needs no files; the others read --data-path")
    g.add_argument("--data-path", default=None,
                   help="imagefolder: root/ (class folders) or root/{train,val}; fashion-mnist: folder "
                        "with the original *-ubyte(.gz) files; cifar10: folder with cifar-10-batches-py")
    g.add_argument("--download", action="store_true",
                   help="fashion-mnist/cifar10: let torchvision download into --data-path (needs internet)")
    g.add_argument("--input-size", type=int, default=256, help="image side in pixels (paper: 256)")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    g.add_argument("--synthetic-size", type=int, default=2000, help="synthetic: train images")
    g.add_argument("--synthetic-val-size", type=int, default=None,
                   help="synthetic: val images (default: synthetic-size // 4)")
    g.add_argument("--synthetic-seed", type=int, default=0,
                   help="synthetic: generator seed (train and val use different streams)")
    return parser


# ---------------------------------------------------------------------------------------------
# Transforms. All start by forcing RGB (grayscale Fashion-MNIST -> 3 equal channels, contract)
# and end in [-1, 1] = Normalize(0.5, 0.5) as in DiT.
# ---------------------------------------------------------------------------------------------
class ToRGB:
    """A class, not a lambda, so transforms pickle for spawn-started DataLoader workers."""

    def __call__(self, img):
        return img.convert("RGB") if img.mode != "RGB" else img


def build_transform(kind, input_size, scale=(0.2, 1.0)):
    """kind: "center" | "rrc" | "eval"; returns PIL image -> (3, input_size, input_size) in [-1, 1].

    center: DiT's ablation setting (RECIPE s6): shorter side resized to input_size, center crop.
            Bicubic with antialias approximates DiT's box-then-bicubic downscaling.
    rrc:    final models (RECIPE s6): RandomResizedCrop + horizontal flip. scale=(0.2, 1) is
            MAE's pre-training crop, which the paper follows; pass (0.08, 1) for MAE's probe.
    eval:   probe evaluation (RECIPE s5, MAE): resize to input_size * 256/224, center crop. Below
            64 px the 256/224 margin would crop away real content of tiny images (28-32 px
            datasets are already object-centred), so there we only resize + center crop.
    """
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "center":
        geo = [T.Resize(input_size, interpolation=bicubic, antialias=True), T.CenterCrop(input_size)]
    elif kind == "rrc":
        geo = [T.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=bicubic, antialias=True),
               T.RandomHorizontalFlip()]
    elif kind == "eval":
        resize = int(round(input_size * 256 / 224)) if input_size >= 64 else input_size
        geo = [T.Resize(resize, interpolation=bicubic, antialias=True), T.CenterCrop(input_size)]
    else:
        raise UserError(f"unknown transform kind {kind!r}; use center, rrc or eval")
    return T.Compose([ToRGB(), *geo, T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


# ---------------------------------------------------------------------------------------------
# Synthetic shapes: the offline default. Ten classes that differ only in shape/texture/layout;
# colour, position, size, rotation, background gradient and noise are random and shared by all
# classes, so no single pixel (nor a linear map of the raw pixels) identifies the class well,
# while a network that learns shape features can. Each image is drawn from its own generator
# seeded by (seed, split stream, index): deterministic, independent of batching and workers,
# and it works at any resolution without holding the set in memory.
# ---------------------------------------------------------------------------------------------
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
        name = SYNTHETIC_CLASSES[label]
        if name == "disc":
            m = rad <= 1
        elif name == "ring":
            m = (rad <= 1) & (rad >= 0.6)
        elif name == "square":
            m = box <= 0.85
        elif name == "triangle":
            m = (pv <= 0.75) & (pv >= -0.95 + 1.9 * pu.abs())
        elif name == "cross":
            m = ((pu.abs() <= 0.3) | (pv.abs() <= 0.3)) & (box <= 0.95)
        elif name == "h-stripes":
            m = (box <= 0.95) & (torch.sin(freq * pv + ph) > 0)
        elif name == "v-stripes":
            m = (box <= 0.95) & (torch.sin(freq * pu + ph) > 0)
        elif name == "checkerboard":
            m = (box <= 0.95) & (torch.sin(freq * pu + ph) * torch.sin(freq * pv + ph) > 0)
        elif name == "two-blobs":
            m = ((pu - 0.55) ** 2 + pv ** 2 <= 0.2) | ((pu + 0.55) ** 2 + pv ** 2 <= 0.2)
        else:  # polka-dots
            m = (box <= 0.95) & (torch.cos(freq * pu + ph) + torch.cos(freq * pv + ph) > 1.0)
        # Colours: random background with a random linear gradient; foreground colour redrawn until
        # it differs clearly from the background (the shape must stay visible; at most a few draws).
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


# ---------------------------------------------------------------------------------------------
# ImageFolder with checks up front and a loader that names the bad file.
# ---------------------------------------------------------------------------------------------
def _checked_loader(path):
    """PIL loader that turns any decoding failure into a UserError naming the file. Checking
    every file before training would cost a full pass over ImageNet, so we check lazily."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise UserError(f"cannot read image file {path} ({type(e).__name__}: {e}); "
                        f"remove or replace it") from None


def _build_imagefolder(path, split, transform):
    if not path:
        raise UserError("--dataset imagefolder needs --data-path (a folder of class folders, "
                        "or one with train/ and val/)")
    if not os.path.isdir(path):
        raise UserError(f"data path {path} does not exist or is not a folder")
    entries = os.listdir(path)
    if not entries:
        raise UserError(f"data path {path} is empty; expected class folders or train/ and val/")
    has_splits = os.path.isdir(os.path.join(path, "train"))
    root = os.path.join(path, split) if has_splits else path
    if has_splits and not os.path.isdir(root):
        raise UserError(f"{path} has train/ but no {split}/ folder; add {root} or use a flat root")
    classes = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    if not classes:
        raise UserError(f"{root} has no class sub-folders; put images in {root}/<class>/")
    ds = torchvision.datasets.ImageFolder(root, transform=transform, loader=_checked_loader,
                                          allow_empty=True)
    if len(ds) == 0:
        raise UserError(f"no images found in the class folders of {root} "
                        f"(extensions {', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)})")
    where = root
    if not has_splits:
        # One flat folder serves both splits: hold out every 10th image per class for val so
        # the probe is never scored on its own training images.
        seen, keep = {}, []
        for i, (_, y) in enumerate(ds.samples):
            k = seen.get(y, 0)
            seen[y] = k + 1
            if (k % 10 == 0) == (split == "val"):
                keep.append(i)
        ds, where = torch.utils.data.Subset(ds, keep), f"{root} (flat root: every 10th image per class is val)"
    return ds, where


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from the original gz files, offline. torchvision (0.29) only checks that the four
# decompressed files exist in <root>/FashionMNIST/raw (MNIST._check_exists); with download=True it
# would instead verify the md5 of the *.gz, which Debian's re-compressed files do not match. So we
# decompress into a cache folder in torchvision's layout and open it with download=False.
# ---------------------------------------------------------------------------------------------
FMNIST_FILES = {"train-images-idx3-ubyte": 2051, "train-labels-idx1-ubyte": 2049,
                "t10k-images-idx3-ubyte": 2051, "t10k-labels-idx1-ubyte": 2049}  # name -> idx magic
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


def cache_dir(*parts):
    """$LDAE_CACHE or ~/.cache/ldae; data folders themselves may be read-only (/usr/share)."""
    root = os.environ.get("LDAE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldae")
    return os.path.join(root, *parts)


def _prepare_fashion_mnist(path):
    """-> root that torchvision's FashionMNIST(root, download=False) accepts."""
    if os.path.isdir(os.path.join(path, "FashionMNIST", "raw")) and all(
            os.path.isfile(os.path.join(path, "FashionMNIST", "raw", n)) for n in FMNIST_FILES):
        return path  # already in torchvision's layout
    found, missing = {}, []
    for name in FMNIST_FILES:
        cands = [os.path.join(d, name + ext) for d in (path, os.path.join(path, "FashionMNIST", "raw"))
                 for ext in ("", ".gz")]
        hit = next((c for c in cands if os.path.isfile(c)), None)
        (missing.append(name) if hit is None else found.__setitem__(name, hit))
    if missing:
        raise UserError(f"Fashion-MNIST files missing in {path}: {', '.join(m + '[.gz]' for m in missing)}; "
                        f"install them with `apt-get install dataset-fashion-mnist` "
                        f"(-> {DEBIAN_FMNIST}) or pass --download")
    root = cache_dir("fashion-mnist", os.path.abspath(path).strip(os.sep).replace(os.sep, "_"))
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name, src in found.items():
        dst = os.path.join(raw, name)
        if os.path.isfile(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            continue
        opener = gzip.open if src.endswith(".gz") else open
        try:
            with opener(src, "rb") as f:
                head = f.read(4)
                if int.from_bytes(head, "big") != FMNIST_FILES[name]:
                    raise UserError(f"{src} is not an idx file of the expected kind "
                                    f"(magic {head.hex()}); re-install the Fashion-MNIST files")
                with open(dst + ".tmp", "wb") as out:  # atomic: a killed run leaves no half file
                    out.write(head)
                    shutil.copyfileobj(f, out)
        except (OSError, EOFError) as e:
            raise UserError(f"cannot read {src} ({e}); re-install the Fashion-MNIST files") from None
        os.replace(dst + ".tmp", dst)
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
            # With the tarball in the folder, --download unpacks it offline: torchvision checks
            # the tarball's md5 and skips the network when it matches.
            raise UserError(f"{path} has no cifar-10-batches-py/ folder; unpack cifar-10-python.tar.gz "
                            f"there, or put the tarball there and pass --download")
    try:
        ds = cls(root, train=(split == "train"), transform=transform, download=args.download)
    except RuntimeError as e:  # "Dataset not found or corrupted", download failures
        raise UserError(f"{name} could not be loaded from {root}: {e}") from None
    except OSError as e:  # no internet, unwritable root
        raise UserError(f"{name}: {e} (offline? use --data-path with local files)") from None
    return ds, root


# ---------------------------------------------------------------------------------------------
def build_dataset(args, split, transform):
    """-> Dataset of (image tensor, int label). Checks paths first; prints a one-line summary."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    name = args.dataset
    if name == "synthetic":
        val = getattr(args, "synthetic_val_size", None) or max(1, args.synthetic_size // 4)
        n = args.synthetic_size if split == "train" else val
        # Images are drawn at input_size, so the "center" transform is an identity crop.
        ds = SyntheticShapes(n, args.input_size, seed=getattr(args, "synthetic_seed", 0),
                             stream=0 if split == "train" else 1, transform=transform)
        where = f"generated, seed {ds.seed}"
    elif name == "imagefolder":
        ds, where = _build_imagefolder(args.data_path, split, transform)
    elif name in ("fashion-mnist", "cifar10"):
        ds, where = _build_torchvision(name, args, split, transform)
    else:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    print(f"[data] {name} {split}: {num_classes(ds)} classes, {len(ds)} images ({where})", flush=True)
    return ds


def num_classes(dataset):
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):  # torch Subset chains
        dataset = dataset.dataset
    return len(dataset.classes)
