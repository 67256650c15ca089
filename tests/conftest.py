# Put the repo root on sys.path so tests import the flat top-level modules
# (data, tokenizer_pca, ...).
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
