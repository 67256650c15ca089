"""The synthetic shapes, the offline default data set (`--dataset synthetic`): ten classes that
differ only in shape, texture and layout. Colour, position, size, rotation, background and noise
are random for all, so no linear map of the pixels gives the class away. Image i has its own
generator, seeded by (seed, split stream, i): the same at any batching, workers or resolution."""
import math

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

SYNTHETIC_CLASSES = ("disc", "ring", "square", "triangle", "cross",
                     "h-stripes", "v-stripes", "checkerboard", "two-blobs", "polka-dots")


def shape_mask(name, pu, pv, freq, phase):
    """Class `name`'s object (S, S) bool in its frame (pu, pv) ~[-1, 1]; freq, phase: texture."""
    rad = (pu ** 2 + pv ** 2).sqrt()
    box = torch.maximum(pu.abs(), pv.abs())
    if name == "disc":
        return rad <= 1
    if name == "ring":
        return (rad <= 1) & (rad >= 0.6)
    if name == "square":
        return box <= 0.85
    if name == "triangle":
        return (pv <= 0.75) & (pv >= -0.95 + 1.9 * pu.abs())
    if name == "cross":
        return ((pu.abs() <= 0.3) | (pv.abs() <= 0.3)) & (box <= 0.95)
    if name == "two-blobs":
        return ((pu - 0.55) ** 2 + pv ** 2 <= 0.2) | ((pu + 0.55) ** 2 + pv ** 2 <= 0.2)
    wave_u = freq * pu + phase
    wave_v = freq * pv + phase
    if name == "h-stripes":
        return (box <= 0.95) & (torch.sin(wave_v) > 0)
    if name == "v-stripes":
        return (box <= 0.95) & (torch.sin(wave_u) > 0)
    if name == "checkerboard":
        return (box <= 0.95) & (torch.sin(wave_u) * torch.sin(wave_v) > 0)
    if name == "polka-dots":
        return (box <= 0.95) & (torch.cos(wave_u) + torch.cos(wave_v) > 1.0)
    raise ValueError(f"unknown synthetic class {name!r}")


class SyntheticShapes(Dataset):
    classes = list(SYNTHETIC_CLASSES)
    KEEP_BYTES = 64 * 2**20        # drawn images kept per process: 21k at 32 px, 340 at 256 px
    kept = {}                      # (img_size, seed, stream, index) -> (image, label), shared
    kept_bytes = 0

    def __init__(self, size=2000, img_size=32, seed=0, stream=0, transform=None):
        self.size, self.img_size, self.seed, self.stream = size, img_size, seed, stream
        self.transform = transform

    def __len__(self):
        return self.size

    def render(self, index):
        """-> (uint8 (3, S, S) tensor, label). Label cycles so classes are exactly balanced."""
        label = index % len(SYNTHETIC_CLASSES)
        seed = ((self.seed * 1_000_003 + self.stream) * 1_000_003 + index) % 2**63
        generator = torch.Generator().manual_seed(seed)

        def uniform(*shape):                                   # U[0, 1), this image's stream
            return torch.rand(shape, generator=generator)
        # Draw at 2x and average-pool: cheap anti-aliasing so edges are not pure staircase.
        S = self.img_size * 2 if self.img_size <= 128 else self.img_size
        centres = (torch.arange(S) + 0.5) / S * 2 - 1                     # pixel centres in [-1, 1]
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")           # (S, S)
        cx, cy = (uniform(2) - 0.5) * 0.9                                  # object centre
        half_size = 0.3 + 0.3 * uniform(1)
        angle = (uniform(1) - 0.5) * (math.pi / 4.5)     # +-20 degrees: keeps h/v stripes apart
        cos, sin = torch.cos(angle), torch.sin(angle)
        pu = ((xx - cx) * cos + (yy - cy) * sin) / half_size              # object frame, ~[-1, 1]
        pv = (-(xx - cx) * sin + (yy - cy) * cos) / half_size
        freq = (2.5 + 2.5 * uniform(1)) * math.pi                          # texture frequency
        phase = uniform(1) * 2 * math.pi
        mask = shape_mask(SYNTHETIC_CLASSES[label], pu, pv, freq, phase)   # (S, S) bool
        # background: random colour + linear gradient; foreground redrawn until clearly different
        background = uniform(3)
        for _ in range(20):
            foreground = uniform(3)
            if (foreground - background).abs().sum() > 0.6:
                break
        direction = uniform(2) * 2 - 1
        gradient = 0.25 * (direction[0] * xx + direction[1] * yy)          # (S, S)
        tint = uniform(3)[:, None, None] * 2 - 1
        img = background[:, None, None] + gradient[None] * tint
        img = torch.where(mask[None], foreground[:, None, None].expand(3, S, S), img)
        if S != self.img_size:
            img = torch.nn.functional.avg_pool2d(img[None], 2)[0]
        img = img + 0.04 * torch.randn(img.shape, generator=generator)     # sensor-like noise
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), label

    def drawn(self, index):
        """render(index), kept for later epochs and data sets while all kept fit in KEEP_BYTES."""
        key = (self.img_size, self.seed, self.stream, index)
        if key in self.kept:
            return self.kept[key]
        item = self.render(index)
        size = item[0].numel()
        if SyntheticShapes.kept_bytes + size <= self.KEEP_BYTES:
            SyntheticShapes.kept[key] = item
            SyntheticShapes.kept_bytes += size
        return item

    def __getitem__(self, index):
        img, label = self.drawn(index)
        pil = T.functional.to_pil_image(img)
        return (pil if self.transform is None else self.transform(pil)), label
