"""Two commands for feeding a GPU (docs/SPEED.md, "The input pipeline"):

  pack   decode a dataset once into the packed format that `--dataset packed` reads
         (util/datasets.Packed): every image resized (shorter side, bicubic) and center-cropped
         to S x S, uint8, in one .npy memmap FILE; labels and classes in FILE.meta.pt.
  bench  decoded + augmented img/s of each input path on this machine's CPU (PIL, packed, and
         the reading and decode_batch of --decode gpu), printed as a markdown table.

  python tools/pack_data.py pack --dataset imagefolder --data-path /data/imagenet --split train \
      --input-size 288 --out /data/in1k_train_288.u8 --num-workers 16
  python tools/pack_data.py bench --data-path /tmp/jpegs --make 1000 --input-size 256 \
      --workers 0,1,2
"""
import argparse
import collections
import contextlib
import functools
import os
import resource
import shutil
import time

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util import cli, datasets, decode, distributed, files, synthetic, transforms  # noqa: E402
from util.cli import UserError  # noqa: E402


# ---- pack
def pack_transform(size):
    """The "center" transform's PIL ops kept in uint8: packed at size == --input-size, the center
    path gives tensors bit-identical to the imagefolder path."""
    resize = T.Resize(size, interpolation=transforms.BICUBIC, antialias=True)
    return T.Compose([transforms.ToRGB(), resize, T.CenterCrop(size), T.PILToTensor()])


def pack(args):
    if args.dataset == "packed":
        raise UserError("--dataset packed is already packed; pack the imagefolder (or other "
                        "dataset) it came from")
    # the file holds decoded pixels, so the DataLoader workers decode (with PIL)
    args.decode = "pil"
    ds = datasets.build_dataset(args, args.split, pack_transform(args.input_size))
    files.claim_outputs([args.out, args.out + ".meta.pt"], args.overwrite,
                        inputs=[args.data_path])
    source = {"dataset": args.dataset, "data_path": os.path.abspath(args.data_path or ""),
              "split": args.split}
    return pack_dataset(ds, args.out, args.input_size, args.num_workers, args.batch_size, source)


def _write_images(tmp, ds, labels, size, batch_size, num_workers):
    """Fill tmp, a new .npy memmap (N, 3, size, size) uint8, with the images of ds, and labels
    (N,) with theirs."""
    shape = (len(ds), 3, size, size)
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    done = 0
    # Workers decode in parallel; no shuffling, so batches arrive in order and labels line up.
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        worker_init_fn=distributed.ignore_stop_signals)
    with cli.progress(total=len(ds), unit="img", desc=f"pack {size}px") as bar:
        for x, y in loader:
            images[done:done + len(x)] = x.numpy()                       # (B, 3, S, S) uint8
            labels[done:done + len(x)] = y
            done += len(x)
            bar.update(len(x))
    images.flush()


def pack_dataset(ds, out, size, num_workers=0, batch_size=64, source=None):
    """ds items: (uint8 (3, size, size), label). Writes out (.npy memmap), then out.meta.pt, each
    atomically: a repack that fails while writing the images keeps the previous pack whole."""
    folder = os.path.dirname(os.path.abspath(out))
    count = len(ds)
    total_bytes = count * 3 * size * size
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist; create it or pass another --out")
    free = shutil.disk_usage(folder).free
    if total_bytes > free:
        raise UserError(f"{out} needs {total_bytes / 1e9:.1f} GB but {folder} has "
                        f"{free / 1e9:.1f} GB free; pass another --out or a smaller size")
    labels = torch.empty(count, dtype=torch.int64)
    start = time.time()
    write = functools.partial(_write_images, ds=ds, labels=labels, size=size,
                              batch_size=batch_size, num_workers=num_workers)
    files.atomic_write(out, write, total_bytes)
    meta = {"version": 1, "shape": [count, 3, size, size], "size": size, "labels": labels,
            "classes": datasets.classes(ds), "source": source or {},
            "fingerprint": datasets.pack_fingerprint(out)}
    files.save_torch(meta, out + ".meta.pt")
    rate = count / (time.time() - start)
    print(f"[pack] {count} images -> {out} ({total_bytes / 1e9:.2f} GB, {rate:.0f} img/s)")
    return out


# ---- bench
def write_jpeg_folder(root, n, size=(500, 375), quality=90, seed=0):
    """n SyntheticShapes JPEGs in root/<class>/ at ImageNet-typical size and quality (bench,
    tests): drawn at the long side, cropped, plus noise (sd 8) so they do not compress trivially
    (~70 KB)."""
    width, height = size
    side = max(size)
    shapes = synthetic.SyntheticShapes(n, side, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    top, left = (side - height) // 2, (side - width) // 2
    with cli.torch_threads(1):
        for i in range(n):
            img, label = shapes.render(i)                                  # (3, side, side) uint8
            img = img[:, top:top + height, left:left + width].float()
            noise = 8 * torch.randn(img.shape, generator=generator)
            img = (img + noise).clamp(0, 255).round().to(torch.uint8)
            folder = os.path.join(root, synthetic.SYNTHETIC_CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            pixels = img.permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=quality)
    return root


BenchRow = collections.namedtuple("BenchRow", "name workers images_per_s images_per_cpu_s load")


def cpu_seconds():
    """CPU time of this process and its reaped children (DataLoader workers are joined at the
    end of a pass)."""
    processes = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    return sum(sum(resource.getrusage(who)[:2]) for who in processes)


def time_loader(name, ds, workers, batch_size, collate_fn=None):
    """One pass over ds through a DataLoader with `workers` workers, timed -> BenchRow."""
    warm_up = DataLoader(Subset(ds, range(batch_size)), batch_size=batch_size,
                         collate_fn=collate_fn)
    next(iter(warm_up))                                   # file and page caches, worker imports
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn)
    # workers = 0: the main process loads, on one core
    threads = cli.torch_threads(1) if workers == 0 else contextlib.nullcontext()
    with threads:
        start, cpu_start, stamps = time.perf_counter(), cpu_seconds(), []
        for _ in loader:
            stamps.append(time.perf_counter() - start)
        cpu = cpu_seconds() - cpu_start
    # Wall img/s in steady state: skip worker start-up and the 2 * workers batches prefetched
    # meanwhile. Images per CPU-second (all processes, IPC included) does not depend on our
    # share of the shared cores.
    skip = max(0, min(2 * workers, len(stamps) - 2))
    if len(stamps) > 1:
        rate = batch_size * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
    else:
        rate = len(ds) / stamps[-1]
    row = BenchRow(name, workers, rate, len(ds) / cpu, os.getloadavg()[0])
    print(f"  {name:<48} {workers} workers: {rate:7.1f} img/s, {row.images_per_cpu_s:6.1f} img "
          f"per CPU-second (load avg {row.load:.2f})", flush=True)
    return row


def first_images(data_path, count, transform):
    """The first `count` images of the JPEG folder data_path, through `transform`."""
    args = argparse.Namespace(dataset="imagefolder", data_path=data_path, decode="pil")
    ds = datasets.build_dataset(args, "train", transform)
    return Subset(ds, range(min(count, len(ds))))


def _decode_on_cpu(batch):
    return decode.batch_to_images(decode.collate(batch)[0], "cpu")


def print_table(rows, target):
    print(f"\n| path | workers | img/s (wall) | img per CPU-second | cores per GPU at "
          f"{target:.0f} img/s | load avg |\n|---|---|---|---|---|---|")
    for row in rows:
        cores = target / row.images_per_cpu_s
        print(f"| {row.name} | {row.workers} | {row.images_per_s:.0f} | "
              f"{row.images_per_cpu_s:.0f} | {cores:.1f} | {row.load:.2f} |")


def bench(args):
    """Decoded + augmented img/s of each input path on this machine's CPU -> the BenchRows."""
    if args.make and not os.path.isdir(args.data_path):
        print(f"[bench] writing {args.make} synthetic JPEGs to {args.data_path}", flush=True)
        write_jpeg_folder(args.data_path, args.make)
    size, batch_size, pack_size = args.input_size, args.batch_size, args.pack_size
    workers = args.workers
    rrc = transforms.build_transform("rrc", size)
    print(f"[bench] {args.data_path}, first {args.images} images, {size}px, batch {batch_size}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    pil_only = first_images(args.data_path, args.images, T.PILToTensor())
    rows = [time_loader("PIL decode only (RGB)", pil_only, 0, batch_size, len)]
    for count in workers:
        pil_rrc = first_images(args.data_path, args.images, rrc)
        rows.append(time_loader("PIL decode + rrc + flip + ToTensor + Normalize", pil_rrc, count,
                                batch_size))
    out = os.path.join(args.pack_dir, f"bench_{pack_size}.u8")
    to_pack = first_images(args.data_path, args.images, pack_transform(pack_size))
    pack_dataset(to_pack, out, pack_size, max(workers))
    for count in workers:
        rows.append(time_loader(f"packed {pack_size}px + rrc + flip + Normalize",
                                datasets.Packed(out, rrc), count, batch_size))
    # uint8 out of the workers (4x fewer bytes through shared memory, float on the GPU): the
    # cost of sending floats between processes
    uint8_rrc = T.Compose(rrc.transforms[:3])
    rows.append(time_loader(f"packed {pack_size}px + rrc + flip, uint8 out",
                            datasets.Packed(out, uint8_rrc), max(workers), batch_size))
    raw = decode.JpegFolder(first_images(args.data_path, args.images, rrc), rrc)
    rows.append(time_loader("read JPEG bytes only (--decode gpu workers)", raw, 0, batch_size,
                            len))
    rows.append(time_loader("decode_batch on CPU (read + decode_jpeg + rrc + flip)", raw, 0,
                            batch_size, _decode_on_cpu))
    print_table(rows, args.target)
    os.remove(out)
    os.remove(out + ".meta.pt")
    return rows


# ---- the command line
def get_args_parser():
    parser = cli.ArgumentParser(prog="tools/pack_data.py", description="Pack a dataset into the "
                                "uint8 format, or benchmark the input paths.")
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=cli.ArgumentParser)
    pack_help = "decode + resize + center-crop every image once into FILE"
    pack_args = datasets.add_data_args(commands.add_parser("pack", help=pack_help))
    pack_args.add_argument("--split", default="train", choices=["train", "val"],
                           help="which split of --dataset to pack")
    pack_args.add_argument("--out", required=True,
                           help="the packed file (.npy memmap) to write; FILE.meta.pt beside it")
    pack_args.add_argument("--overwrite", action="store_true",
                           help="replace an existing --out (kept whole until the new one is done)")
    pack_args.add_argument("--batch-size", type=cli.bounded(int, 1), default=64,
                           help="images a DataLoader worker decodes per batch")
    bench_help = "img/s of the PIL, packed and decode_batch paths on a JPEG folder"
    bench_args = commands.add_parser("bench", help=bench_help)
    bench_args.add_argument("--data-path", required=True, help="a folder of class folders of JPEGs")
    bench_args.add_argument("--make", type=cli.bounded(int, 0), default=0,
                            help="first write this many synthetic JPEGs if the folder is absent")
    bench_args.add_argument("--input-size", type=cli.bounded(int, 1), default=256,
                            help="the training crop side every row produces")
    bench_args.add_argument("--workers", type=cli.number_list(int, 0), default=[0, 1, 2],
                            help="comma-separated DataLoader worker counts")
    bench_args.add_argument("--images", type=cli.bounded(int, 1), default=512,
                            help="images timed per row")
    bench_args.add_argument("--batch-size", type=cli.bounded(int, 1), default=32,
                            help="images per DataLoader batch")
    bench_args.add_argument("--pack-size", type=cli.bounded(int, 1), default=288,
                            help="stored size for the packed row")
    bench_args.add_argument("--pack-dir", default="/tmp",
                            help="where the packed row's temporary file goes")
    bench_args.add_argument("--target", type=cli.bounded(float, 0, low_open=True), default=1790,
                            help="img/s one GPU consumes (vit_b, H100, 50%% MFU)")
    return parser


def main(args):
    if args.command == "pack":
        return pack(args)
    return bench(args)


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
