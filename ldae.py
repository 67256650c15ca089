"""The latent Denoising Autoencoder (l-DAE) of Chen, Liu, Xie, He, "Deconstructing Denoising
Diffusion Models for Self-Supervised Learning" (arXiv 2401.14404; "RECIPE sN": RECIPE.md's
section N). It needs only torch and tokenizer_pca.py: copy the pair into your project and call

    pca = PatchPCA.load("pca.pt")                    # python tokenizer_pca.py --out pca.pt
    model = build_model("vit_b", pca)                # ViT-B encoder + ViT-B decoder, 256 px
    loss = model.loss(images)                        # images: (B, 3, 256, 256) in [-1, 1]
    feats = model.forward_features(images)           # (B, 768): what the linear probe reads
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tokenizer_pca import LATENT_NORMS, PatchPCA


# ---- Transformer pieces shared with dit_baseline.py, DiT's parameter names (RECIPE s4)
def modulate(x, shift, scale):
    return x * (1 + scale) + shift        # adaLN: a per-example affine map of the normed tokens


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions (grid*grid, dim): columns, then rows, as MAE, DiT (RECIPE s4)."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    col, row = (axis.reshape(-1, 1) * omega.reshape(1, -1) for axis in (cols, rows))  # angles
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, one strided conv. (B, C, H, W) -> (B, L, D)."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (B,) -> c (B, dim): sinusoids, then an MLP; l-DAE's dim: width / 4 (RECIPE s4, as good)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        angles = t.float().reshape(-1, 1) * freqs.reshape(1, -1)           # (B, half)
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                               # (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))       # DiT's tanh-GELU


class DiTBlock(nn.Module):
    """DiT's pre-norm adaLN-Zero block: c sets both norms' shift / scale and both branch gates."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, cond_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x, c):                                            # x (B, L, D), c (B, C)
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)  # six (B, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """DiT's head: adaLN, LayerNorm, Linear to p*p*C values per token in PatchPCA.patchify order."""

    def __init__(self, dim, patch_size, out_chans, cond_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))

    def forward(self, x, c):                                            # (B, L, D) -> (B, L, p*p*C)
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_dit_weights(model, active=False):
    """DiT's init (zero adaLN and output); active=True opens the gates: a random pre-norm ViT, a
    probe's honest random baseline (with zero gates it would be pooled patch embeddings)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight                                    # treat the conv as a linear
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)
    blocks = [(b.adaLN_modulation[-1], 6) for b in model.blocks]
    for mod, chunks in blocks + [(model.final_layer.adaLN_modulation[-1], 2)]:
        nn.init.zeros_(mod.bias)
        if not active:
            nn.init.zeros_(mod.weight)
            continue
        nn.init.normal_(mod.weight, std=0.02)
        if chunks == 6:        # (shift1, scale1, gate1, shift2, scale2, gate2): both gates open
            mod.bias.data.view(6, -1)[[2, 5]] = 1.0
    if not active:
        nn.init.zeros_(model.final_layer.linear.weight)
        nn.init.zeros_(model.final_layer.linear.bias)


def run_blocks(blocks, x, c, depth=None, checkpoint=False):
    """The first `depth` blocks (None: all); checkpoint recomputes activations (memory, vit_l)."""
    for block in blocks[:depth]:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
        else:
            x = block(x, c)
    return x


def pooled_features(blocks, x, c, depth, default_depth, pool=True):
    """The probe's tokens after block depth (None: default_depth; a list: each), mean-pooled."""
    many = isinstance(depth, (list, tuple))
    depths = list(depth) if many else [depth or default_depth]
    kept = {}
    for index, block in enumerate(blocks[:max(depths)], start=1):
        x = block(x, c)
        if index in depths:
            kept[index] = x.mean(dim=1) if pool else x
    features = [kept[k] for k in depths]
    return features if many else features[0]


def noise_levels(t, default, images):
    """t: None (the default), an int or a (B,) tensor (distill.py's policy) -> (B,) long."""
    t = default if t is None else t
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return t.to(images.device, torch.long)
    return torch.full((images.shape[0],), int(t), device=images.device, dtype=torch.long)


def registry_config(models, name, overrides, what):
    """models[name] updated with the overrides that are not None (argparse's unset flags)."""
    if name not in models:
        raise KeyError(f"unknown {what} model {name!r}; choose from {sorted(models)}")
    cfg = {**models[name], **{k: v for k, v in overrides.items() if v is not None}}
    return {k: v for k, v in cfg.items() if k not in ("family", "name")}


# ---- The l-DAE model (RECIPE s3, s4)
# Sizes (RECIPE s4): `depth` counts encoder + decoder blocks, no bottleneck; the probe reads the
# first half. CPU sizes: d = 8 whitened latents learn there, d = 4 at pixel scale did not (RESULTS).
_CPU = dict(img_size=32, patch_size=4, latent_dim=8, latent_norm="whiten")
MODELS = {
    "vit_tiny": dict(hidden_size=64, depth=4, num_heads=4, **_CPU),
    "vit_small": dict(hidden_size=192, depth=12, num_heads=3, **_CPU),
    "vit_b": dict(hidden_size=768, depth=24, num_heads=12),          # ViT-B enc + ViT-B dec
    "vit_half_l": dict(hidden_size=1024, depth=24, num_heads=16),    # DiT-L as 12 + 12 (ablations)
    "vit_l": dict(hidden_size=1024, depth=48, num_heads=16),         # ViT-L enc + ViT-L dec
}

MODEL_FLAGS = ("img_size", "patch_size", "latent_dim", "latent_scale", "latent_norm",
               "residual_weight", "noise", "single_sigma", "target", "cond_ratio",
               "grad_checkpoint")


def check_config(pca, img_size, patch_size, in_chans, latent_dim, latent_norm, noise, target):
    """ValueError, in words a pretrain.py user can act on, for a config LDAE cannot take."""
    if patch_size < 1 or img_size < 1 or img_size % patch_size:
        raise ValueError(f"the image size {img_size} (--input-size) must be a positive multiple "
                         f"of the patch size {patch_size} (--patch-size)")
    D = patch_size * patch_size * in_chans
    if not 1 <= latent_dim <= D:
        raise ValueError(f"latent_dim {latent_dim} (--latent-dim) must be in 1..{D}: D = "
                         f"{patch_size} x {patch_size} x {in_chans} coordinates per patch")
    if pca.patch_size != patch_size or pca.channels != in_chans:
        raise ValueError(f"the PCA has {pca.patch_size}px x {pca.channels}ch patches, the model "
                         f"{patch_size}px x {in_chans}ch (RECIPE s2): refit it")
    choices = {"latent_norm": (latent_norm, LATENT_NORMS), "noise": (noise, ("multi", "single")),
               "target": (target, ("latent", "projected", "original"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


class LDAE(nn.Module):
    def __init__(self, pca, img_size=256, patch_size=16, in_chans=3, hidden_size=768, depth=24,
                 num_heads=12, mlp_ratio=4.0, cond_ratio=0.25, latent_dim=32, latent_scale=None,
                 latent_norm="none", residual_weight=0.1, noise="multi",
                 single_sigma=math.sqrt(1 / 3), num_steps=1000,
                 sigma_max=math.sqrt(2), target="original", grad_checkpoint=False, name="custom"):
        super().__init__()
        check_config(pca, img_size, patch_size, in_chans, latent_dim, latent_norm, noise, target)
        # RECIPE s2: the model owns the latent's scale and norm, the PCA stays as it was fitted
        self.latent_scale = float(pca.scale if latent_scale is None else latent_scale)
        self.latent_norm = latent_norm
        self.config = dict(family="ldae", name=name, img_size=img_size, patch_size=patch_size,
                           in_chans=in_chans, hidden_size=hidden_size, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, cond_ratio=cond_ratio,
                           latent_dim=latent_dim, latent_scale=self.latent_scale,
                           latent_norm=latent_norm, residual_weight=residual_weight, noise=noise,
                           single_sigma=single_sigma, num_steps=num_steps, sigma_max=sigma_max,
                           target=target, grad_checkpoint=grad_checkpoint)
        self.pca, self.patch_size, self.depth, self.d = pca, patch_size, depth, latent_dim
        self.noise, self.num_steps, self.sigma_max = noise, num_steps, sigma_max
        self.single_sigma, self.grad_checkpoint, self.target = single_sigma, grad_checkpoint, target
        cond_dim = max(1, int(hidden_size * cond_ratio))
        grid = img_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_chans, hidden_size)
        self.t_embedder = TimestepEmbedder(cond_dim)
        # (1, L, D): fixed, so a buffer, not a parameter (RECIPE s4)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, cond_dim)
                                    for _ in range(depth))
        if target == "latent":     # Table 3 "image input via inverse PCA": the d coordinates
            self.final_layer = FinalLayer(hidden_size, 1, latent_dim, cond_dim)
        else:                      # the clean image patch, p*p*C values per token
            self.final_layer = FinalLayer(hidden_size, patch_size, in_chans, cond_dim)
        # loss weights in the PCA basis (RECIPE s3): 1 on the d noised, less on the unseen residual
        w = torch.full((pca.dim,), float(residual_weight))
        w[:latent_dim] = 1.0
        self.register_buffer("loss_weight", w, persistent=False)
        self.init_weights()

    init_weights = init_dit_weights

    # --- noise (RECIPE s3: no input scaling, sigma_t linear from 0 to sqrt 2 over T = 1000) ---
    @property
    def single_t(self):
        """The t a single-level model is told in training: the step whose sigma is the level."""
        return round(self.single_sigma / self.sigma_max * self.num_steps)

    @property
    def probe_t(self):
        """The default probe level (RECIPE s5): t = 10, or a single-level model's only level."""
        return self.single_t if self.noise == "single" else 10

    def sigma(self, t):                                                 # (B,) long -> (B,) float
        sigma = self.sigma_max * t.float() / self.num_steps
        if self.noise == "single":     # RECIPE s3 ablation: the one level is exactly single_sigma
            sigma = torch.where(t == self.single_t, self.single_sigma, sigma)  # clean t=0: sigma 0
        return sigma

    def sample_t(self, batch, device):
        if self.noise == "single":
            return torch.full((batch,), self.single_t, device=device, dtype=torch.long)
        return torch.randint(0, self.num_steps, (batch,), device=device)   # t ~ U{0..T-1} [DiT]

    def latent_gain(self):
        """(d,) multipliers of the PCA coordinates (--latent-scale x --latent-norm, RECIPE s2)."""
        return self.pca.latent_gain(self.d, self.latent_norm, self.latent_scale)

    def add_noise(self, x0, t):
        """Noise in the d-dim PCA latent (the paper's key finding, Table 2), back to an image: x_t =
        V_d^T (g V_d x0 + sigma_t eps) / g, g = latent_gain(); the residual is dropped."""
        with torch.autocast(x0.device.type, enabled=False):   # projections in fp32: cheap, exact
            gain = self.latent_gain()
            z0 = self.pca.encode(x0.float(), self.d, gain)                  # (B, L, d)
            z = z0 + self.sigma(t).view(-1, 1, 1) * torch.randn_like(z0)
            return self.pca.decode(z, gain=gain)

    def forward(self, x, t, depth=None):
        """x (B, C, H, W), t (B,) -> clean patches (B, L, p*p*C), or the tokens after `depth`."""
        x = self.x_embedder(x) + self.pos_embed                         # (B, L, D)
        c = self.t_embedder(t)                                          # (B, D * cond_ratio)
        x = run_blocks(self.blocks, x, c, depth, self.grad_checkpoint and self.training)
        return x if depth is not None else self.final_layer(x, c)

    def loss(self, x0, labels=None):
        """The l-DAE objective (RECIPE s3), r = V_full (x0 - net(x_t)) weighted by loss_weight,
        times lambda_t = 1 / (1 + sigma_t^2); `labels` is ignored: l-DAE is unconditional."""
        t = self.sample_t(x0.shape[0], x0.device)                       # (B,)
        pred = self(self.add_noise(x0, t), t).float()                   # (B, L, D) or (B, L, d)
        with torch.autocast(x0.device.type, enabled=False):
            lam = 1.0 / (1.0 + self.sigma(t).square())                  # (B,)
            if self.target == "original":          # l-DAE, Table 3 last row
                r = self.pca.coords(self.pca.patchify(x0.float()) - pred)          # (B, L, D)
                per_image = (r.square() * self.loss_weight).sum(-1).mean(-1)       # (B,)
            elif self.target == "projected":       # Table 3 "image output": predict V_d^T z0
                target = self.pca.patchify(self.pca.project(x0.float(), self.d))
                per_image = (target - pred).square().sum(-1).mean(-1)
            else:                                  # Table 3 "image input": predict z0 itself
                z0 = self.pca.encode(x0.float(), self.d, self.latent_gain())
                per_image = (z0 - pred).square().sum(-1).mean(-1)
            return (lam * per_image).mean()

    def forward_features(self, images, t=None, depth=None, noisy=False, pool=True,
                         clean="projected"):
        """Features (RECIPE s5) after block `depth` (None: the encoder's last) at t (None: probe_t)
        of the image projected on the PCA subspace (as in training; measured best), raw or noisy."""
        if clean not in ("projected", "image"):
            raise ValueError(f"clean must be 'projected' or 'image', not {clean!r}")
        levels = noise_levels(t, self.probe_t, images)
        x = images
        if noisy or clean == "projected":
            x = self.add_noise(images, levels if noisy else torch.zeros_like(levels))
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(levels)
        return pooled_features(self.blocks, tokens, c, depth, self.depth // 2, pool)

    @torch.no_grad()
    def denoise(self, images, t):
        """For image grids: (noisy input, denoised output) as images (B, C, H, W) at level t."""
        levels = torch.as_tensor(t, device=images.device).long().expand(images.shape[0])
        noisy = self.add_noise(images, levels)
        out = self(noisy, levels).float()
        if self.target == "latent":
            return noisy, self.pca.decode(out, gain=self.latent_gain())
        return noisy, self.pca.unpatchify(out)


def build_model(name, pca=None, **overrides):
    """The registry behind `pretrain.py --model`; pca=None: an identity basis a checkpoint fills."""
    cfg = registry_config(MODELS, name, overrides, "l-DAE")
    if pca is None:
        patch_size = cfg.get("patch_size", 16)
        pca = PatchPCA.empty(patch_size, cfg.get("in_chans", 3), cfg.get("img_size", 256))
    return LDAE(pca, name=name, **cfg)
