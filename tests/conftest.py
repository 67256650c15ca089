# The repository root (the stage scripts and util/) and tools/ on sys.path, as running a script
# from the root puts them.
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]


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
