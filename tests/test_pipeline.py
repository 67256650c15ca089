# Tests for the fast input paths (util/datasets.py, util/decode.py, tools/pack_data.py): the
# packed uint8 format (pack -> read back, equal to the PIL path; errors), --decode gpu
# (decode_batch on CPU vs the PIL transforms, same crops for the same seed; bytes dataset +
# collate + batch_to_images), and the pack / bench command line. No timing asserts.
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pack_data
from util import cli, datasets, decode, transforms
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# decode_batch vs PIL: the JPEG decoders agree (both libjpeg-turbo on CPU); the resamplers differ
# in rounding only (PIL: 8-bit fixed-point bicubic; torch: float, the same a = -0.5 kernel when
# antialiasing), so a few grey levels at edges. Measured on these images: mean |diff| ~0.002 and
# max ~0.05 in [-1, 1] units; the bounds leave 3-5x margin, and a wrong crop, flip, channel order
# or normalisation gives mean |diff| > 0.1.
MEAN_TOL, MAX_TOL = 0.01, 0.2


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch):
    """The same decoding tests on both decoders of file bytes (decode.DECODERS, the first is
    used)."""
    if request.param not in decode.DECODERS:
        pytest.skip(f"{request.param} is not installed (or does not load with this torch)")
    monkeypatch.setattr(decode, "DECODERS", (request.param,))
    return request.param


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """20 synthetic JPEGs (48x36, q90) in 10 class folders: a flat imagefolder root."""
    return str(pack_data.write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), 20, size=(48, 36)))


def _args(*argv):
    return datasets.add_data_args(argparse.ArgumentParser()).parse_args(list(argv))


def _pack(src, out, size, workers=0, split="train"):
    a = pack_data.get_args_parser().parse_args(
        ["pack", "--dataset", "imagefolder", "--data-path", src, "--split", split,
         "--input-size", str(size), "--out", str(out), "--num-workers", str(workers)])
    return pack_data.main(a)


def test_pack_reads_back_equal_to_the_pil_path(jpegs, tmp_path):
    out = tmp_path / "train_24.u8"
    _pack(jpegs, out, 24, workers=1)             # parallel decode through a DataLoader worker
    assert not os.path.exists(str(out) + ".tmp") and not os.path.exists(str(out) + ".meta.pt.tmp")
    meta = torch.load(str(out) + ".meta.pt", weights_only=True)
    arr = np.load(out)
    assert arr.shape == (10, 3, 24, 24) and arr.dtype == np.uint8
    assert meta["shape"] == [10, 3, 24, 24]
    # flat root: 10 train images
    ref = datasets.build_dataset(_args("--dataset", "imagefolder", "--data-path", jpegs), "train",
                                 transforms.build_transform("center", 24))
    # --data-path with {split}: the file serves that split whole; stored at --input-size the
    # "center" transform is the identity geometry, so the tensors equal the PIL path's exactly.
    packed = _args("--dataset", "packed", "--data-path", str(tmp_path / "{split}_24.u8"),
                   "--input-size", "24")
    ds = datasets.build_dataset(packed, "train", transforms.build_transform("center", 24))
    assert len(ds) == len(ref) == 10 and datasets.classes(ds) == datasets.classes(ref)
    for i in range(10):
        (x, y), (xr, yr) = ds[i], ref[i]
        assert y == yr and x.dtype == torch.float32 and x.shape == (3, 24, 24)
        assert torch.equal(x, xr)
    # Center crops at 16 from the stored 24px resize a second time (uint8 tensors): close to PIL
    # straight from the JPEG. Two resamplings of these tiny noisy images differ by ~0.05 on average;
    # a one-pixel shift or a flip gives 0.12-0.16 (measured), so 0.08 separates right from wrong.
    c16 = transforms.build_transform("center", 16)
    small = datasets.Packed(str(out), transforms.build_transform("center", 16))
    files = [ref.dataset.samples[j][0] for j in ref.indices]
    d = torch.stack([(small[i][0] - c16(Image.open(files[i]))).abs() for i in range(10)])
    assert d.mean() < 0.08
    # rrc on the packed tensors: shape, range, and the same draws as the PIL path for the same seed
    rrc = datasets.Packed(str(out), transforms.build_transform("rrc", 16))
    torch.manual_seed(3)
    x1 = rrc[0][0]
    torch.manual_seed(3)
    assert torch.equal(x1, rrc[0][0]) and x1.shape == (3, 16, 16)
    assert -1 <= x1.min() and x1.max() <= 1
    # through worker processes (the memmap is re-opened there, not pickled)
    xs, ys = next(iter(torch.utils.data.DataLoader(ds, batch_size=10, num_workers=1, timeout=60)))
    assert torch.equal(xs[3], ds[3][0]) and ys.tolist() == [ds[i][1] for i in range(10)]


def test_packed_file_without_split_holds_out_val(jpegs, tmp_path):
    out = tmp_path / "all.u8"
    a = pack_data.get_args_parser().parse_args(
        ["pack", "--dataset", "imagefolder", "--data-path", jpegs, "--split", "val",
         "--input-size", "16", "--out", str(out), "--num-workers", "0"])
    pack_data.main(a)
    assert len(np.load(out)) == 10                               # the flat root's val half
    a = _args("--dataset", "packed", "--data-path", str(out), "--input-size", "16")
    tr, va = datasets.build_dataset(a, "train", None), datasets.build_dataset(a, "val", None)
    assert (len(tr), len(va)) == (0, 10)                        # one image per class: all are val


def test_packed_errors_name_the_file_and_the_fix(jpegs, tmp_path):
    tf = transforms.build_transform("center", 16)
    with pytest.raises(UserError, match="needs --data-path FILE"):
        datasets.build_dataset(_args("--dataset", "packed"), "train", tf)
    missing = tmp_path / "nope.u8"
    packed = _args("--dataset", "packed", "--data-path", str(missing))
    with pytest.raises(UserError, match=f"{missing} does not exist.*tools/pack_data.py pack"):
        datasets.build_dataset(packed, "train", tf)
    good = tmp_path / "g.u8"
    _pack(jpegs, good, 16)
    with pytest.raises(UserError, match="smaller than --input-size 32.*re-pack"):
        datasets.build_dataset(_args("--dataset", "packed", "--data-path", str(good)), "train",
                               transforms.build_transform("rrc", 32))
    bad = tmp_path / "bad.u8"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="meta.pt .*is missing"):
        datasets.Packed(str(bad))
    os.link(str(good) + ".meta.pt", str(bad) + ".meta.pt")
    with pytest.raises(UserError, match=f"{bad} is not a packed uint8 file"):
        datasets.Packed(str(bad))
    # the right format, the wrong count
    np.save(str(tmp_path / "other.npy"), np.zeros((3, 3, 16, 16), np.uint8))
    os.replace(tmp_path / "other.npy", bad)
    with pytest.raises(UserError, match="does not match"):
        datasets.Packed(str(bad))
    with pytest.raises(UserError, match="already packed"):
        args = pack_data.get_args_parser().parse_args(["pack", "--dataset", "packed", "--out",
                                                       str(bad)])
        pack_data.main(args)


def test_a_repack_needs_overwrite_and_a_failed_one_keeps_the_previous_pack(jpegs, tmp_path):
    out = tmp_path / "p.u8"
    _pack(jpegs, out, 16)
    before = (out.read_bytes(), (tmp_path / "p.u8.meta.pt").read_bytes())
    with pytest.raises(UserError, match="p.u8 exists and this run did not write it.*--overwrite"):
        _pack(jpegs, out, 16)

    class Failing(torch.utils.data.Dataset):        # the disk or a decoder fails half-way
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 6:
                raise OSError("a read error half-way")
            return torch.zeros(3, 16, 16, dtype=torch.uint8), 0
    with pytest.raises(OSError, match="half-way"):
        pack_data.pack_dataset(Failing(), str(out), 16, batch_size=2)
    assert (out.read_bytes(), (tmp_path / "p.u8.meta.pt").read_bytes()) == before
    assert len(datasets.Packed(str(out))) == 10
    assert sorted(os.listdir(tmp_path)) == ["p.u8", "p.u8.meta.pt"]    # no temporary left
    # a meta file of another pack of the same shape (a repack killed between the two files)
    other = tmp_path / "other"
    other.mkdir()
    _pack(jpegs, other / "p.u8", 16, split="val")
    os.replace(other / "p.u8.meta.pt", tmp_path / "p.u8.meta.pt")
    with pytest.raises(UserError, match="was written for another .*p.u8"):
        datasets.Packed(str(out))


def _pil_reference(files, kind, size, seeds):
    tf, out = transforms.build_transform(kind, size), []
    for f, s in zip(files, seeds):
        torch.manual_seed(s)
        out.append(tf(Image.open(f)))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["center", "eval", "rrc"])
def test_decode_batch_on_cpu_matches_the_pil_transform(jpegs, kind, decoder):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(jpegs) for f in fs)[:8]
    raw = [decode.read_bytes(f) for f in files]
    seeds = list(range(100, 108))
    x = decode.decode_batch(raw, 32, kind, "cpu", seeds=seeds)
    ref = _pil_reference(files, kind, 32, seeds)      # same seed -> same crop box and flip draw
    d = (x - ref).abs()
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert d.mean() < MEAN_TOL and d.max() < MAX_TOL, (d.mean(), d.max())
    if kind == "rrc":   # other seeds -> other crops: the seeds are really used
        other = decode.decode_batch(raw, 32, kind, "cpu", seeds=[s + 50 for s in seeds])
        assert (other - ref).abs().mean() > 0.05


def test_decode_gpu_dataset_collate_and_batch_to_images(jpegs, tmp_path, decoder):
    a = _args("--dataset", "imagefolder", "--data-path", jpegs, "--decode", "gpu")
    tf = transforms.build_transform("rrc", 32)
    # linprobe.py, tokenizer_pca.py
    with pytest.raises(UserError, match="--decode gpu is only for pretrain.py"):
        datasets.build_dataset(a, "train", tf)
    ds = datasets.build_dataset(a, "train", tf, decode_gpu_ok=True)
    item, y = ds[0]
    assert isinstance(item, decode.RawImages) and item.jpegs[0].dtype == torch.uint8
    assert item.kind == "rrc"
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1,
                                         collate_fn=decode.collate, timeout=60)
    xb, yb = next(iter(loader))
    assert isinstance(xb, decode.RawImages) and len(xb.jpegs) == 4
    assert yb.tolist() == [ds[i][1] for i in range(4)]
    x = decode.batch_to_images(xb, torch.device("cpu"))
    assert x.shape == (4, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    # crops are a function of the item seeds
    assert torch.equal(x, decode.batch_to_images(xb, "cpu"))
    # the decoded() view: the same images through PIL (for the PCA fit / grids), same labels
    pil = decode.decoded(ds)
    assert pil[0][0].shape == (3, 32, 32) and pil[0][1] == y and decode.decoded(pil) is pil
    # tensors pass through collate / batch_to_images unchanged
    xt, _ = decode.collate([pil[0], pil[1]])
    assert torch.equal(decode.batch_to_images(xt, "cpu"), xt)
    # errors: other datasets, foreign transforms, broken files (named)
    with pytest.raises(UserError, match="--decode gpu decodes JPEG files"):
        datasets.build_dataset(_args("--decode", "gpu"), "train", tf, decode_gpu_ok=True)
    with pytest.raises(UserError, match="use --decode pil"):
        datasets.build_dataset(a, "train", lambda im: im, decode_gpu_ok=True)
    bad = tmp_path / "bad"
    pack_data.write_jpeg_folder(bad, 2, size=(20, 16))
    broken = os.path.join(bad, "disc", "broken.jpg")
    open(broken, "wb").write(b"\xff\xd8 not a jpeg")
    raw = [decode.read_bytes(os.path.join(bad, "disc", "00000.jpg")), decode.read_bytes(broken)]
    with pytest.raises(UserError, match="cannot decode image file .*broken.jpg"):
        decode.decode_batch(raw, 16, "center", "cpu", names=["ok.jpg", broken])


def test_png_in_a_jpeg_batch_falls_back_to_decode_image(jpegs, tmp_path, decoder):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(jpegs) for f in fs)[:2]
    Image.open(files[1]).save(tmp_path / "x.png")          # ImageNet has a PNG named .JPEG
    raw = [decode.read_bytes(files[0]), decode.read_bytes(str(tmp_path / "x.png"))]
    x = decode.decode_batch(raw, 24, "center", "cpu")
    ref = _pil_reference([files[0], str(tmp_path / "x.png")], "center", 24, [0, 0])
    assert (x - ref).abs().mean() < MEAN_TOL


def test_cli_help_bench_and_exit_code(jpegs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_cli(pack_data.main, pack_data.get_args_parser(), ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "pack" in out and "bench" in out
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_data.py"), "pack",
                        "--dataset", "imagefolder", "--data-path", str(tmp_path / "none"),
                        "--out", str(tmp_path / "x.u8")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: data path" in r.stderr and "Traceback" not in r.stderr
    # bench end to end on a tiny folder (it prints figures; nothing is asserted about speed)
    rows = pack_data.main(pack_data.get_args_parser().parse_args(
        ["bench", "--data-path", jpegs, "--input-size", "16", "--workers", "0", "--images", "8",
         "--batch-size", "2", "--pack-size", "20", "--pack-dir", str(tmp_path)]))
    assert len(rows) == 6 and all(r[2] > 0 and r[3] > 0 for r in rows)
    assert "| decode_batch on CPU" in capsys.readouterr().out and not os.listdir(tmp_path)
