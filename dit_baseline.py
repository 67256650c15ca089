"""The DiT baseline of Chen, Liu, Xie, He 2024 (RECIPE s7): the latent diffusion transformer (DiT,
Peebles & Xie 2023) the paper deconstructs into l-DAE, its objective, and PRESETS: one per row of
the paper's Tables 1-3 and section 5 (README has the paper's top-1 of each).

    python pretrain.py --preset t2_pca_d32 --dataset imagefolder --data-path IMNET    # a row
    python pretrain.py --preset t3_ldae --model vit_tiny --input-size 32 --epochs 5   # row, small
    model = build_model("dit_l_1", pca, latent_dim=32, schedule="linear_gamma2")      # in Python
    loss = model.loss(images)         # images (B, 3, 256, 256) in [-1, 1]; labels if class_cond
"""
import math

import torch
import torch.nn as nn

from ldae import (DiTBlock, FinalLayer, PatchEmbed, TimestepEmbedder, init_dit_weights,
                  noise_levels, pooled_features, registry_config, run_blocks, sincos_pos_embed)
from tokenizer_pca import LATENT_NORMS, PatchPCA


class LabelEmbedder(nn.Module):
    """Label -> (B, dim); row num_classes is the null class (DiT's label dropout; the probe's)."""

    def __init__(self, num_classes, dim, dropout_prob=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ---- Noise schedules (RECIPE s7). x_t = gamma_t z0 + sigma_t eps, t in {0..T-1}, T = 1000.
SCHEDULES = ("ddpm", "linear_gamma2", "no_scaling")
PREDICTIONS = ("eps", "x0")


def make_schedule(name, T=1000):
    """-> (gamma (T,), sigma (T,)) float64; ddpm and linear_gamma2: sigma_t^2 = 1 - gamma_t^2."""
    t = torch.arange(T, dtype=torch.float64)
    if name == "ddpm":                      # Table 1 rows 1-4; DDPM's linear beta_t
        g2 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    elif name == "linear_gamma2":           # Table 1 last row, Tables 2-3; t is step t+1 (DDPM)
        g2 = (1 - (t + 1) / T).clamp_min(0.5 / T)   # at 0 an eps-prediction's x0 is undefined
    elif name == "no_scaling":              # l-DAE's noise (Table 3 row 3 on, RECIPE s3)
        return torch.ones(T, dtype=torch.float64), math.sqrt(2) * t / T
    else:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return g2.sqrt(), (1 - g2).sqrt()


# ---- The DiT, in the official module names (x_embedder, t_embedder, y_embedder, blocks.N...)
_SIZES = dict(s=(384, 12, 6), b=(768, 12, 12), l=(1024, 24, 16), xl=(1152, 28, 16))
MODELS = {f"dit_{s}_{p}": dict(hidden_size=w, depth=d, num_heads=h, dit_patch=p)
          for s, (w, d, h) in _SIZES.items() for p in (1, 2, 4, 8)}
# CPU/test sizes: 32 px, 4 px PCA patches -> an (8 x 8 x latent_dim) grid (64 or 16 tokens).
MODELS["dit_tiny_1"] = dict(hidden_size=64, depth=4, num_heads=4, dit_patch=1, img_size=32,
                            patch_size=4, latent_dim=4)
MODELS["dit_tiny_2"] = dict(MODELS["dit_tiny_1"], dit_patch=2)

# What pretrain.py may pass (dest names); util/registry.py turns latents_file into input and sizes
MODEL_FLAGS = ("img_size", "patch_size", "latent_dim", "latent_scale", "latent_norm", "cond_ratio",
               "schedule", "prediction", "class_cond", "num_classes", "class_dropout_prob",
               "learn_sigma", "input", "dit_input", "latents_file", "latent_channels",
               "latent_size", "grad_checkpoint")


def check_config(pca, input, prediction, img_size, patch_size, latent_dim, latent_norm):
    """A ValueError a pretrain.py user can act on, or the latent width (latent_dim 0: all D)."""
    if input not in ("pca", "latents"):
        raise ValueError(f"--dit-input must be pca or latents, not {input!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
    if patch_size < 1 or img_size < 1:
        raise ValueError(f"--patch-size {patch_size} and --input-size {img_size} must be >= 1")
    if input == "pca":
        if pca.patch_size != patch_size or pca.channels != 3:
            raise ValueError(f"the PCA has {pca.patch_size}px patches but the model wants "
                             f"{patch_size}px: refit the PCA or pass --patch-size {pca.patch_size}")
        D = pca.dim
        latent_dim = latent_dim if latent_dim and latent_dim > 0 else D
        if latent_dim > D:
            raise ValueError(f"latent_dim {latent_dim} exceeds D = {D} of "
                             f"{patch_size}x{patch_size}x3 patches: use a smaller --latent-dim "
                             f"or a larger patch size")
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size "
                             f"{patch_size}")
    if latent_norm not in LATENT_NORMS:
        raise ValueError(f"--latent-norm must be one of {', '.join(LATENT_NORMS)}, "
                         f"not {latent_norm!r}")
    if input == "latents" and latent_norm != "none":
        raise ValueError("--latent-norm needs the PCA's eigenvalues; for --latents-file "
                         "scale the latents yourself or pass --latent-scale")
    return latent_dim


class DiT(nn.Module):
    def __init__(self, pca, img_size=256, patch_size=16, latent_dim=32, latent_scale=None,
                 latent_norm=None, cond_ratio=1.0, input="pca", latent_channels=4,
                 latent_size=32, hidden_size=1024, depth=24,
                 num_heads=16, mlp_ratio=4.0, dit_patch=1, class_cond=False, num_classes=1000,
                 class_dropout_prob=0.1, learn_sigma=False, schedule="ddpm", prediction="eps",
                 num_steps=1000, grad_checkpoint=False, name="custom"):
        super().__init__()
        # "global" is DiT's rule, one factor to unit variance for the VP schedules; measured best
        if latent_norm is None:
            latent_norm = "global" if input == "pca" else "none"
        latent_dim = check_config(pca, input, prediction, img_size, patch_size, latent_dim,
                                  latent_norm)
        if input == "pca":     # the network's "image": the grid of PCA latents, one d per patch
            latent_channels = latent_dim
            latent_size = img_size // patch_size
        if latent_size % dit_patch:
            raise ValueError(f"the {latent_size}x{latent_size} latent grid does not tile into DiT "
                             f"patches of {dit_patch}: pick a dit_*_{{1,2,4,8}} model that "
                             f"divides it")
        self.latent_scale = float(pca.scale if latent_scale is None else latent_scale)
        self.latent_norm = latent_norm
        self.config = dict(family="dit", name=name, img_size=img_size, patch_size=patch_size,
                           latent_dim=latent_dim, latent_scale=self.latent_scale,
                           latent_norm=latent_norm, cond_ratio=cond_ratio, input=input,
                           latent_channels=latent_channels, latent_size=latent_size,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, dit_patch=dit_patch, class_cond=bool(class_cond),
                           num_classes=num_classes, class_dropout_prob=class_dropout_prob,
                           learn_sigma=bool(learn_sigma), schedule=schedule, prediction=prediction,
                           num_steps=num_steps, grad_checkpoint=bool(grad_checkpoint))
        self.input, self.C, self.grid, self.p = input, latent_channels, latent_size, dit_patch
        self.pca, self.depth, self.num_steps, self.prediction = pca, depth, num_steps, prediction
        self.class_cond, self.grad_checkpoint = bool(class_cond), bool(grad_checkpoint)
        # learn_sigma adds DiT's learned-variance outputs, which the loss ignores (no sampling)
        self.out_channels = latent_channels * (2 if learn_sigma else 1)
        gamma, sigma = make_schedule(schedule, num_steps)
        self.register_buffer("gamma", gamma.float(), persistent=False)   # (T,): not in state dict,
        self.register_buffer("sigma", sigma.float(), persistent=False)   # so official keys match
        # cond_ratio: 1 in official DiT (its checkpoints load), 1/4 in the paper's rows (RECIPE s4)
        cond_dim = max(1, int(hidden_size * cond_ratio))
        self.x_embedder = PatchEmbed(dit_patch, latent_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(cond_dim)
        if self.class_cond:          # unconditional models have no y_embedder at all
            self.y_embedder = LabelEmbedder(num_classes, cond_dim, class_dropout_prob)
        grid = latent_size // dit_patch
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, cond_dim)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, dit_patch, self.out_channels, cond_dim)
        self.init_weights()

    def init_weights(self, active=False):
        init_dit_weights(self, active)   # xavier, zero adaLN + output (adaLN-Zero), N(0,.02) t-MLP
        if self.class_cond:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)   # as DiT

    def latent_gain(self):
        """(d,) multipliers of the PCA coordinates, ldae.LDAE's rule (RECIPE s2)."""
        return self.pca.latent_gain(self.C, self.latent_norm, self.latent_scale)

    def encode(self, images):
        """images -> clean latent z0 (B, C, h, w), fp32; input="latents": batch x latent_scale."""
        with torch.autocast(images.device.type, enabled=False):
            if self.input == "latents":
                return images.float() * self.latent_scale
            z = self.pca.encode(images.float(), self.C, self.latent_gain())  # (B, h*w, d) row-major
            return z.transpose(1, 2).reshape(z.shape[0], self.C, self.grid, self.grid)

    def decode(self, z):
        """latent (B, C, h, w) -> image by inverse PCA; input="latents": its first 3 channels."""
        if self.input == "latents":
            return z[:, :3] if z.shape[1] >= 3 else z[:, :1].expand(-1, 3, -1, -1)
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().flatten(2).transpose(1, 2)                        # (B, L, d)
            return self.pca.decode(z, gain=self.latent_gain())

    def _cond(self, x, t, y, train):
        c = self.t_embedder(t)                                          # (B, D)
        if self.class_cond:
            num_classes = self.y_embedder.num_classes
            # the label range is checked on CPU only: on GPU int(y.max()) would sync every step
            if y is None:                                               # unconditional: null class
                y = torch.full((x.shape[0],), num_classes, device=x.device, dtype=torch.long)
            elif y.device.type == "cpu" and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
                raise ValueError(f"labels must be in 0..{num_classes - 1}: pass "
                                 f"num_classes = the dataset's class count to build_model")
            c = c + self.y_embedder(y, train)
        return self.x_embedder(x) + self.pos_embed, c                   # (B, L, D), (B, D)

    def forward(self, x, t, y=None, depth=None):
        """x (B, C, h, w), t, y (None: null class) -> (B, out_channels, h, w), or tokens (depth)."""
        x, c = self._cond(x, t, y, self.training)
        x = run_blocks(self.blocks, x, c, depth, self.grad_checkpoint and self.training)
        if depth is not None:
            return x
        x = self.final_layer(x, c)                                      # (B, L, p*p*out), (p,q,c)
        B, g, p = x.shape[0], self.grid // self.p, self.p
        x = x.reshape(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, self.out_channels, g * p, g * p)

    def add_noise(self, z0, t, eps=None):
        eps = torch.randn_like(z0) if eps is None else eps
        return self.gamma[t].view(-1, 1, 1, 1) * z0 + self.sigma[t].view(-1, 1, 1, 1) * eps, eps

    def sample_t(self, batch, device):
        return torch.randint(0, self.num_steps, (batch,), device=device)   # t ~ U{0..T-1} [DiT]

    def loss(self, images, labels=None):
        """The diffusion loss, a mean over latent elements (ADM's mean_flat): eps or weighted x0."""
        if self.class_cond and labels is None:
            raise ValueError("a class-conditional DiT needs labels: call loss(images, labels)")
        z0 = self.encode(images)                                        # (B, C, h, w) fp32
        t = self.sample_t(z0.shape[0], z0.device)                       # (B,)
        xt, eps = self.add_noise(z0, t)
        pred = self(xt, t, labels)[:, :self.C].float()                  # drop the variance half
        with torch.autocast(z0.device.type, enabled=False):
            if self.prediction == "eps":                                # DiT; Tables 1-2, 3 row 1
                return (eps - pred).square().mean()
            g2, s2 = self.gamma[t].square(), self.sigma[t].square()
            # VP: gamma_t^2 (Table 3 row 2); no_scaling: 1 / (1 + sigma_t^2) (row 3); SNR: eps loss
            lam = g2 / (g2 + s2)                                        # (B,)
            return (lam * (z0 - pred).square().mean((1, 2, 3))).mean()

    probe_t = 10                        # RECIPE s5: the probe's default noise level

    def forward_features(self, images, t=None, depth=None, noisy=False, pool=True):
        """ldae.pooled_features after block `depth` (default: the first half, RECIPE s7) at level t,
        input gamma_t z0 (eps = 0; noisy=True draws it); the null class: a probe sees no label."""
        z0 = self.encode(images)
        levels = noise_levels(t, self.probe_t, z0)
        eps = None if noisy else torch.zeros_like(z0)
        xt, _ = self.add_noise(z0, levels, eps)
        tokens, c = self._cond(xt, levels, None, False)
        return pooled_features(self.blocks, tokens, c, depth, self.depth // 2, pool)

    @torch.no_grad()
    def denoise(self, images, t):
        """(noisy, denoised) images at level t: x_t and the one-step x0 estimate, null class."""
        z0 = self.encode(images)
        levels = torch.as_tensor(t, device=z0.device).long().expand(z0.shape[0])
        xt, _ = self.add_noise(z0, levels)
        out = self(xt, levels)[:, :self.C].float()                      # unconditional
        g, s = self.gamma[levels].view(-1, 1, 1, 1), self.sigma[levels].view(-1, 1, 1, 1)
        x0 = out if self.prediction == "x0" else (xt - s * out) / g     # eps -> x0 estimate
        return self.decode(xt), self.decode(x0)


def build_model(name, pca=None, **overrides):
    """The registry behind `pretrain.py --model dit_*`; pca=None: an identity basis, as ldae's."""
    cfg = registry_config(MODELS, name, overrides, "DiT")
    # argparse hands boolean flags over as the strings typed
    spellings = {**dict.fromkeys(("true", "1", "yes", "on"), True),
                 **dict.fromkeys(("false", "0", "no", "off"), False)}
    for key in ("class_cond", "learn_sigma", "grad_checkpoint"):
        if isinstance(cfg.get(key), str):
            if cfg[key].lower() not in spellings:
                raise ValueError(f"--{key.replace('_', '-')} must be true or false, not "
                                 f"{cfg[key]!r}")
            cfg[key] = spellings[cfg[key].lower()]
    given = cfg.pop("dit_input", cfg.get("input", "pca"))     # dit_input: an alias of input
    cfg["input"] = "latents" if given == "latent" else given
    if pca is None:
        pca = PatchPCA.empty(cfg.get("patch_size", 16), 3, cfg.get("img_size", 256))
    return DiT(pca, name=name, **cfg)


# ---- Presets: every row of RECIPE s7 + the section-5 ablations. Values are pretrain.py dest names.
_BASE = dict(epochs=400, batch_size=2048, blr=1e-4, warmup_epochs=100, weight_decay=0.0,
             aug="center", input_size=256)                        # RECIPE s6 / s7: all rows
# cond_ratio 0.25: the paper's DiT rows shrink the conditioning MLP as its l-DAE (RECIPE s4)
_DIT_LAT = dict(_BASE, model="dit_l_2", dit_input="latents", latents_file=None, class_cond=True,
                schedule="ddpm", prediction="eps", cond_ratio=0.25)  # Table 1: latents 32x32x4
_DIT_PCA = dict(_BASE, model="dit_l_1", dit_input="pca", class_cond=False,
                schedule="linear_gamma2", prediction="eps", cond_ratio=0.25)  # Table 2/3: 16x16xd
_LDAE = dict(_BASE, model="vit_half_l", latent_dim=32, noise="multi", target="original",
             residual_weight=0.1)                                 # l-DAE, ViT-1/2L (12 + 12)
PRESETS = {
    # Table 1 (needs --latents-file: a KL-VAE / VQGAN's latents; see docs/USAGE.md)
    "t1_dit_cond": _DIT_LAT,
    "t1_no_cond": dict(_DIT_LAT, class_cond=False),
    "t1_no_perceptual": dict(_DIT_LAT, class_cond=False),   # latents of a tokenizer w/o perceptual
    "t1_no_adversarial": dict(_DIT_LAT, class_cond=False),  # ... and w/o adversarial loss (a VAE)
    "t1_new_schedule": dict(_DIT_LAT, class_cond=False, schedule="linear_gamma2"),
    # Table 2: PCA latent dim d; pixel = all D = 768 (latent_dim 0): the pixels, rotated
    **{f"t2_pca_d{d}": dict(_DIT_PCA, latent_dim=d) for d in (8, 16, 32, 64, 128)},
    "t2_pixel": dict(_DIT_PCA, latent_dim=0),
    # Table 3: from PCA d = 32 toward a classical DAE
    "t3_pca_eps": dict(_DIT_PCA, latent_dim=32),
    "t3_predict_x0": dict(_DIT_PCA, latent_dim=32, prediction="x0"),
    "t3_no_input_scaling": dict(_DIT_PCA, latent_dim=32, prediction="x0", schedule="no_scaling"),
    "t3_image_input": dict(_LDAE, target="latent"),
    "t3_image_output": dict(_LDAE, target="projected"),
    "t3_ldae": dict(_LDAE),
    # Section 5 ablations and final models (random crop from here on)
    "abl_single_level": dict(_LDAE, noise="single"),
    "abl_random_crop": dict(_LDAE, aug="rrc"),
    "final_vit_b": dict(_LDAE, aug="rrc", model="vit_b"),
    "final_vit_half_l": dict(_LDAE, aug="rrc"),
    "final_vit_l": dict(_LDAE, aug="rrc", model="vit_l"),
    "final_vit_half_l_800ep": dict(_LDAE, aug="rrc", epochs=800),
    "final_vit_half_l_1600ep": dict(_LDAE, aug="rrc", epochs=1600),
    "final_vit_b_1600ep": dict(_LDAE, aug="rrc", model="vit_b", epochs=1600),
    "final_vit_l_1600ep": dict(_LDAE, aug="rrc", model="vit_l", epochs=1600),
}
# The paper probes at "t = 10 and clean input in all our experiments, except Tab. 4 where we use
# the optimal setting" (RECIPE s5): these rows; linprobe.py --select-setting finds that setting.
TABLE4_PRESETS = ("final_vit_b_1600ep", "final_vit_l_1600ep")
