"""Every model family by name, and a checkpoint back to its exact model: the one place to ask."""
import hashlib

import torch

import dit_baseline
import ldae
from tokenizer_pca import PatchPCA
from util import datasets, resnet
from util.checkpoint import load_checkpoint, load_weights
from util.cli import UserError, flag

FAMILIES = {"ldae": ldae, "dit": dit_baseline, "resnet": resnet}
PRETRAIN_MODELS = sorted({**ldae.MODELS, **dit_baseline.MODELS})      # what --model may name
# The flags of pretrain.py's "model flags" group: the model config in the checkpoint holds them
MODEL_ARGS = ("latent_dim", "latent_scale", "latent_norm", "cond_ratio", "residual_weight",
              "noise", "single_sigma", "target", "patch_size", "grad_checkpoint", "schedule",
              "prediction", "class_cond", "dit_input", "latents_file")


def family_of(name):
    for family in ("ldae", "dit"):
        if name in FAMILIES[family].MODELS:
            return family
    raise UserError(f"unknown --model {name!r}; choose from {', '.join(PRETRAIN_MODELS)}")


def build_model(name, pca=None, **overrides):
    """The family's build_model with the flags it takes (None: the registry's value). A flag of
    the other family is refused, not dropped: `--class-cond true` means nothing to an l-DAE."""
    family = FAMILIES[family_of(name)]
    given = {k: v for k, v in overrides.items() if v is not None and v is not False}
    foreign = sorted(k for k in given if k in MODEL_ARGS and k not in family.MODEL_FLAGS)
    if foreign:
        kind = "an l-DAE" if family is ldae else "a DiT"
        raise UserError(f"{', '.join(map(flag, foreign))}: not a flag of --model {name} ({kind}); "
                        f"drop it, or pick a model of the other family (a --preset sets the "
                        f"flags of its own family)")
    kept = {k: v for k, v in overrides.items() if k in family.MODEL_FLAGS and v is not None}
    if kept.get("latents_file"):                    # the DiT's input shape and class count
        latents = datasets.open_latents(kept.pop("latents_file"))
        kept.update(input="latents", latent_channels=latents.latents.shape[1],
                    latent_size=latents.latents.shape[2])
        kept.setdefault("num_classes", len(latents.classes))
    try:
        return family.build_model(name, pca, **kept)
    except (ValueError, KeyError, TypeError) as e:       # a size or flag the model cannot take
        raise UserError(f"--model {name}: {e}") from None


def load(path):
    """-> a model checkpoint (pretrain.py's, or distill.py's student.pt), weights only."""
    return load_checkpoint(path, required=("model", "model_config", "pca", "step"))


def model_from_checkpoint(ckpt, weights="ema", device="cpu"):
    """The checkpoint's exact model (its config + PCA basis) with its EMA or raw weights."""
    cfg = dict(ckpt["model_config"])
    family, name = cfg.pop("family", None), cfg.pop("name", None)
    if family == "repfusion":
        raise UserError("this is a distill.py run's checkpoint (student, adaptor, policy); the "
                        "student alone is OUTPUT_DIR/student.pt")
    if family not in FAMILIES or name not in FAMILIES[family].MODELS:
        raise UserError(f"the checkpoint's model {family!r} / {name!r} is not in this version's "
                        f"registry ({', '.join(PRETRAIN_MODELS)}, resnet18)")
    weights_of = ckpt.get("ema") if weights == "ema" else ckpt["model"]
    if weights_of is None:
        print("[ckpt] no EMA weights in this checkpoint (trained with --ema 0): using the raw "
              "weights")
        weights_of = ckpt["model"]
    pca = None
    if ckpt.get("pca") is not None:
        pca = load_pca(ckpt["pca"], "the checkpoint's PCA basis")
    try:
        model = FAMILIES[family].build_model(name, pca, **cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint's model config cannot be built ({e}); was it written by "
                        f"another version of pretrain.py?") from None
    load_weights(model, weights_of)
    return model.to(device).eval()


def load_pca(saved, where):
    """PatchPCA.from_dict, its ValueError one line naming `where` (a --pca file, a checkpoint)."""
    try:
        return PatchPCA.from_dict(saved)
    except ValueError as e:
        raise UserError(f"{where}: {e}; write a basis with tokenizer_pca.py") from None


def checksum(model):
    """A digest of every tensor of a model's state dict: its identity across runs."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(
                torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
