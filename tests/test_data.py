# Tests for data.py, synthetic.py, augment.py and cli.run_cli: every dataset error names its
# path/file; offline Fashion-MNIST from gz files; synthetic determinism; transforms; UserError
# through DataLoader workers and run_cli (exit 2).
import argparse
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from util import cli, datasets, synthetic, transforms
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(*argv):
    return datasets.add_data_args(argparse.ArgumentParser()).parse_args(list(argv))


def _tf(size=16):
    return transforms.build_transform("center", size)


def _make_imagefolder(root, classes=("a", "b"), per_class=3, size=20):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            arr = np.random.RandomState(i).randint(0, 255, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


# --- imagefolder -------------------------------------------------------------------------------
def test_imagefolder_flat_and_split_layouts(tmp_path, capsys):
    _make_imagefolder(tmp_path / "flat", per_class=12)
    a = _args("--dataset", "imagefolder", "--data-path", str(tmp_path / "flat"))
    tr, va = datasets.build_dataset(a, "train", _tf()), datasets.build_dataset(a, "val", _tf())
    # items 0 and 10 of each class are val
    assert (len(tr), len(va)) == (20, 4) and datasets.num_classes(tr) == 2
    assert "2 classes, 20 images" in capsys.readouterr().out
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and y in (0, 1)
    _make_imagefolder(tmp_path / "sp" / "train", classes=("a", "b", "c"))
    _make_imagefolder(tmp_path / "sp" / "val", classes=("a", "b", "c"), per_class=1)
    a = _args("--dataset", "imagefolder", "--data-path", str(tmp_path / "sp"))
    assert len(datasets.build_dataset(a, "train", _tf())) == 9
    assert len(datasets.build_dataset(a, "val", _tf())) == 3
    assert "3 classes, 3 images" in capsys.readouterr().out


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("empty", "is empty"),
    ("no_classes", "has no class sub-folders"), ("no_images", "no images found"),
    ("no_val", "no val/ folder"), ("no_path", "needs --data-path")])
def test_imagefolder_errors_name_the_path(tmp_path, case, match):
    p = tmp_path / case
    if case == "empty":
        p.mkdir()
    elif case == "no_classes":
        p.mkdir()
        (p / "readme.txt").write_text("x")
    elif case == "no_images":
        (p / "cls").mkdir(parents=True)
        (p / "cls" / "notes.txt").write_text("x")
    elif case == "no_val":
        _make_imagefolder(p / "train")
    argv = ["--dataset", "imagefolder"] + ([] if case == "no_path" else ["--data-path", str(p)])
    with pytest.raises(UserError, match=match) as e:
        datasets.build_dataset(_args(*argv), "val" if case == "no_val" else "train", _tf())
    if case != "no_path":
        assert str(p) in str(e.value)


def test_unreadable_image_names_file_in_process_and_in_workers(tmp_path):
    root = _make_imagefolder(tmp_path / "bad", classes=("a",), per_class=1)
    (root / "a" / "broken.png").write_bytes(b"this is not a png")
    args = _args("--dataset", "imagefolder", "--data-path", str(root))
    ds = datasets.build_dataset(args, "train", _tf())
    bad = [i for i, (f, _) in enumerate(ds.dataset.samples) if f.endswith("broken.png")][0]
    with pytest.raises(UserError, match="cannot read image file .*broken.png"):
        ds.dataset[bad]
    # Through a worker process torch re-raises UserError(traceback text); the message is recovered.
    loader = torch.utils.data.DataLoader(ds.dataset, batch_size=2, num_workers=1)
    with pytest.raises(UserError) as e:
        list(loader)
    msg = str(e.value)
    assert msg.startswith("cannot read image file") and "broken.png" in msg
    assert "Traceback" not in msg


def test_subprocess_exit_code_2_no_traceback(tmp_path):
    root = _make_imagefolder(tmp_path / "bad", classes=("a",), per_class=2)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    env = dict(os.environ)
    cmd = [sys.executable, os.path.join(ROOT, "tokenizer_pca.py"), "--dataset", "imagefolder",
           "--data-path", str(root), "--input-size", "16", "--patch-size", "4",
           "--num-workers", "1", "--out", str(tmp_path / "p.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error: cannot read image file" in r.stderr
    assert "broken.jpg" in r.stderr


def test_run_cli_passes_through_success_and_other_errors():
    p = argparse.ArgumentParser()
    assert cli.run_cli(lambda a: 7, p, []) == 7
    with pytest.raises(SystemExit) as e:
        cli.run_cli(lambda a: (_ for _ in ()).throw(UserError("bad")), p, [])
    assert e.value.code == 2
    with pytest.raises(ZeroDivisionError):  # real bugs keep their traceback
        cli.run_cli(lambda a: 1 / 0, p, [])


# --- Fashion-MNIST from the original gz files, offline -----------------------------------------
def _write_idx_gz(folder, n_train=12, n_test=5):
    """Tiny fake Fashion-MNIST in the original idx format (big-endian magic, dims, uint8 data)."""
    rs = np.random.RandomState(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rs.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([2051, n, 28, 28], ">i4").tobytes() + imgs.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + labels.tobytes())
    return folder


def test_fashion_mnist_from_gz_folder_offline(tmp_path):
    src = _write_idx_gz(tmp_path)
    os.chmod(src, 0o555)  # data folders may be read-only (/usr/share): nothing is written
    try:
        a = _args("--dataset", "fashion-mnist", "--data-path", str(src), "--input-size", "32")
        tr = datasets.build_dataset(a, "train", transforms.build_transform("center", 32))
        va = datasets.build_dataset(a, "val", transforms.build_transform("eval", 32))
    finally:
        os.chmod(src, 0o755)
    assert (len(tr), len(va), datasets.num_classes(tr)) == (12, 5, 10)
    x, y = tr[3]
    assert x.shape == (3, 32, 32) and y == 3
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale -> 3 equal channels
    # the items are torchvision's: the same PIL image of the same uint8 pixels
    pixels = datasets.FashionMNIST(str(src), "train").images[3]
    assert torch.equal(x[0], transforms.build_transform("center", 32)(
        Image.fromarray(pixels).convert("RGB"))[0])


def test_fashion_mnist_errors(tmp_path):
    (tmp_path / "fm").mkdir()
    src = _write_idx_gz(tmp_path / "fm")
    os.remove(src / "t10k-labels-idx1-ubyte.gz")
    a = _args("--dataset", "fashion-mnist", "--data-path", str(src))
    missing = r"t10k-labels-idx1-ubyte\[\.gz\] is missing in .*fm.*dataset-fashion-mnist"
    with pytest.raises(UserError, match=missing):
        datasets.build_dataset(a, "val", _tf())
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03junk")  # an images magic where labels belong
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is not a whole idx file"):
        datasets.build_dataset(a, "val", _tf())
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([2049, 5], ">i4").tobytes() + b"\x01\x02")     # 2 of its 5 labels
    with pytest.raises(UserError, match="not a whole idx file"):
        datasets.build_dataset(a, "val", _tf())
    with pytest.raises(UserError, match="does not exist"):
        args = _args("--dataset", "fashion-mnist", "--data-path", str(tmp_path / "x"))
        datasets.build_dataset(args, "train", _tf())


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(UserError, match="has no cifar-10-batches-py"):
        args = _args("--dataset", "cifar10", "--data-path", str(tmp_path))
        datasets.build_dataset(args, "train", _tf())


@pytest.mark.skipif(not os.path.isdir(datasets.DEBIAN_FMNIST),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    args = _args("--dataset", "fashion-mnist", "--input-size", "32")
    ds = datasets.build_dataset(args, "val", _tf(32))
    # the first test item is an ankle boot (class 9)
    assert len(ds) == 10000 and ds[0][0].shape == (3, 32, 32) and ds[0][1] == 9


# --- synthetic ---------------------------------------------------------------------------------
def test_synthetic_deterministic_balanced_and_split_streams(capsys):
    a = _args("--synthetic-size", "40", "--input-size", "32")
    tr1 = datasets.build_dataset(a, "train", _tf(32))
    tr2 = datasets.build_dataset(a, "train", _tf(32))
    va = datasets.build_dataset(a, "val", _tf(32))
    assert len(va) == 10 and datasets.num_classes(tr1) == 10 == len(synthetic.SYNTHETIC_CLASSES)
    assert "10 classes, 40 images" in capsys.readouterr().out
    x0, y0 = tr1[5]
    assert x0.shape == (3, 32, 32) and -1 <= x0.min() < 0 < x0.max() <= 1
    assert torch.equal(x0, tr2[5][0]) and y0 == tr2[5][1]
    assert not torch.equal(x0, va[5][0])  # val is a different stream
    other = synthetic.SyntheticShapes(40, 32, seed=1)
    assert not torch.equal(tr1.render(5)[0], other.render(5)[0])
    assert sorted(tr1[i][1] for i in range(40)) == sorted(list(range(10)) * 4)  # balanced
    assert synthetic.SyntheticShapes(4, 64).render(2)[0].shape == (3, 64, 64)  # any resolution


def test_synthetic_images_are_kept_up_to_the_budget_and_equal_a_fresh_draw(monkeypatch):
    shapes = synthetic.SyntheticShapes
    monkeypatch.setattr(shapes, "kept", {})
    monkeypatch.setattr(shapes, "kept_bytes", 0)
    monkeypatch.setattr(shapes, "KEEP_BYTES", 4 * 3 * 32 * 32)       # room for four images
    ds = shapes(10, 32, seed=5)
    first = [ds.drawn(i) for i in range(10)]
    assert sorted(shapes.kept) == [(32, 5, 0, i) for i in range(4)]
    assert shapes(10, 32, seed=5).drawn(2) is first[2]               # shared by equal sets
    drawn_again = []
    render = ds.render

    def counted(i):
        drawn_again.append(i)
        return render(i)
    monkeypatch.setattr(ds, "render", counted)
    second = [ds.drawn(i) for i in range(10)]
    assert drawn_again == list(range(4, 10))                        # the kept four not redrawn
    fresh = shapes(10, 32, seed=5)
    for i in range(10):
        assert torch.equal(first[i][0], second[i][0]) and first[i][1] == second[i][1]
        assert torch.equal(first[i][0], fresh.render(i)[0])


def test_synthetic_colour_does_not_give_away_the_class():
    # Colour/position are shared across classes: the mean colour of an image is near chance for
    # the class (a nearest-class-mean rule on it should do poorly), unlike the shape.
    ds = synthetic.SyntheticShapes(300, 16)
    items = [ds.render(i) for i in range(300)]
    X = torch.stack([img.float().mean((1, 2)) for img, _ in items])  # (N, 3) mean colour
    y = torch.tensor([label for _, label in items])
    means = torch.stack([X[y == c].mean(0) for c in range(10)])
    acc = ((X[:, None] - means[None]).norm(dim=-1).argmin(1) == y).float().mean()
    assert acc < 0.3


# --- transforms --------------------------------------------------------------------------------
def test_transforms_shapes_and_range():
    gray = np.random.RandomState(0).randint(0, 256, (40, 60), dtype=np.uint8)
    img = Image.fromarray(gray)
    for kind in ("center", "rrc", "eval"):
        x = transforms.build_transform(kind, 32)(img)
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    white = transforms.build_transform("center", 8)(Image.new("RGB", (10, 10), (255, 255, 255)))
    assert torch.allclose(white, torch.ones(3, 8, 8))  # [-1, 1] normalisation
    with pytest.raises(UserError, match="unknown transform"):
        transforms.build_transform("bogus", 32)
