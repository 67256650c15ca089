# The repository root (the stage scripts and util/) and tools/ on sys.path, as running a script
# from the root puts them.
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]


def pytest_configure(config):
    """README's command runs the tests in pytest-xdist workers (`-n auto`, one per core): each
    takes its share of the cores for torch's threads, or fewer if OMP_NUM_THREADS says so (more
    would oversubscribe: 2 workers x 2 threads on 2 cores ran 24 of 364 tests in 7 minutes,
    OpenMP threads spinning for a descheduled peer). Tests that share a costly fixture carry an
    xdist_group mark: `--dist loadgroup` sends them to one worker, which builds it once."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        share = max(1, (cores or 1) // workers)
        omp = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(min(share, int(omp)) if omp.isdigit() and int(omp) > 0 else share)


@pytest.fixture(scope="session")
def quickstart_checkpoint(tmp_path_factory):
    """README's quick start, `python pretrain.py --model vit_tiny` with no other training flag
    (the registry's d and latent normalisation, pretrain.SMALL_DEFAULTS' batch, lr and length:
    310 steps on the synthetic set, about a minute on 2 cores), trained once for the tests that
    need a model that learned something: the probe's and the distillation's."""
    import pretrain
    out = tmp_path_factory.mktemp("quickstart")
    pretrain.main(pretrain.get_args_parser().parse_args(
        ["--model", "vit_tiny", "--num-workers", "0", "--output-dir", str(out)]))
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="session")
def pca_file(tmp_path_factory):
    """A 4 px patch basis fitted on 48 synthetic 32 px images (vit_tiny's patches)."""
    from tokenizer_pca import fit_pca
    from util import files, synthetic, transforms
    path = str(tmp_path_factory.mktemp("pca") / "pca.pt")
    shapes = synthetic.SyntheticShapes(48, 32, transform=transforms.build_transform("center", 32))
    files.save_torch(fit_pca(shapes, 4, progress=False, device="cpu").to_dict(), path)
    return path


def tiny_flags(out, pca, *extra):
    """vit_tiny on 48 synthetic images, global batch 8: 6 steps per epoch, 3 epochs = 18 steps."""
    return ["--model", "vit_tiny", "--synthetic-size", "48", "--batch-size", "8", "--epochs", "3",
            "--warmup-epochs", "0.5", "--lr", "1e-3", "--ema", "0.9", "--num-workers", "0",
            "--pca", pca, "--output-dir", str(out), "--log-every", "2", "--save-every", "1",
            "--grid-every", "3", *extra]


def tiny_run(out, pca, *extra):
    import pretrain
    return pretrain.main(pretrain.get_args_parser().parse_args(tiny_flags(out, pca, *extra)))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, pca_file):
    """A vit_tiny checkpoint of one step: a file every reader takes."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_run(out, pca_file, "--max-steps", "1")
    return str(out / "checkpoint.pt")
