"""Augmentation constants shared by the DALI graphs and the torch baseline.

The values are those of the ImageNet recipes ReLabel trains with: channel statistics on a 0..1
scale, and the AlexNet-style PCA lighting basis (eigenvector ``i`` is column ``i``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# Lighting adds PCA_BASIS @ alpha (0..1 scale), alpha ~ N(0, LIGHTING_STD): eigenvectors scaled by eigenvalues.
PCA_BASIS = tuple(tuple(PCA_EIGVEC[c][j] * PCA_EIGVAL[j] for j in range(3)) for c in range(3))
LIGHTING_STD = 0.1
COLOR_JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - 0.4, 1 + 0.4]
# The grey that contrast and saturation blend towards (ITU-R 601 luma, as PIL's "L" conversion).
# The weights sum to 1, which is what lets the three jitter steps compose in any order (PIPELINE.md).
GREY_WEIGHTS = (0.299, 0.587, 0.114)

RANDOM_AREA = (0.08, 1.0)
RANDOM_ASPECT_RATIO = (3 / 4, 4 / 3)


# ---- per-sample random parameters ------------------------------------------------------------
# The training graph draws no random numbers itself: the sample source draws every sample's crop
# window, flip, jitter factors and lighting coefficients from (seed, rank, epoch, slot) and sends
# them with the sample, so an epoch's augmentation is a pure function of those four numbers and a
# resumed run replays it exactly without rebuilding or reseeding a pipeline.
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many windows before falling back
# Uniforms per sample: an (area, log-ratio) pair per attempt, the window's top and left, the flip,
# and the three jitter factors.
_UNIFORMS = 2 * RRC_ATTEMPTS + 2 + 1 + 3
_BLOCK = 1024  # slots drawn at once: one generator per block, not per sample


def random_resized_crop_window(draws, height: int, width: int, scale=RANDOM_AREA,
                               ratio=RANDOM_ASPECT_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop of a ``height x width`` image: torchvision's
    ``RandomResizedCrop.get_params`` step for step. ``draws`` supplies ``uniform(a, b)`` and
    ``integers(low, high)`` (high exclusive), in the order torchvision draws them."""
    area = height * width
    # float32 logs, as torchvision computes them (torch.log of a float32 tensor)
    log_ratio = tuple(float(np.log(np.float32(r))) for r in ratio)
    for _ in range(RRC_ATTEMPTS):
        target_area = area * draws.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(draws.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = draws.integers(0, height - h + 1)
            left = draws.integers(0, width - w + 1)
            return top, left, h, w
    # Fallback: the whole image, cut to the nearest ratio in range, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _RowDraws:
    """``uniform``/``integers`` served from one sample's row of pre-drawn uniforms [0, 1)."""

    __slots__ = ("row", "position")

    def __init__(self, row: list[float]):
        self.row, self.position = row, 0

    def next(self) -> float:
        value = self.row[self.position]
        self.position += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.next()

    def integers(self, low: int, high: int) -> int:
        return low + min(int(self.next() * (high - low)), high - low - 1)


@dataclass(frozen=True)
class SampleAugment:
    """One sample's training augmentation: crop window in pixels of the (EXIF-oriented when
    asked) image, its normalized xyxy box, the flip, the brightness/contrast/saturation factors
    and the PCA lighting coefficients."""

    top: int
    left: int
    height: int
    width: int
    box: tuple[float, float, float, float]
    mirror: bool
    jitter: tuple[float, float, float]
    lighting: tuple[float, float, float]


class AugmentDraws:
    """Per-sample augmentation as a pure function of ``(seed, rank, epoch, slot)``.

    Random numbers come in blocks of ``_BLOCK`` slots, one Philox stream per block keyed by
    ``(seed, rank, epoch, block)``, so any worker computes any slot's numbers the same way, in
    any order, and a worker serving consecutive slots draws once per block. The last block used
    is kept (a worker's slots are mostly consecutive)."""

    def __init__(self, *, seed: int, rank: int, random_area=RANDOM_AREA,
                 random_aspect_ratio=RANDOM_ASPECT_RATIO, flip: bool = True,
                 color_jitter: float = COLOR_JITTER, lighting_std: float = LIGHTING_STD):
        self.seed, self.rank = int(seed), int(rank)
        self.scale, self.ratio = tuple(random_area), tuple(random_aspect_ratio)
        self.flip, self.color_jitter, self.lighting_std = bool(flip), float(color_jitter), float(lighting_std)
        self._cached = None

    def _block(self, epoch: int, block: int) -> tuple[list, list]:
        if self._cached is None or self._cached[0] != (epoch, block):
            key = np.random.SeedSequence([self.seed, self.rank, epoch, block]).generate_state(2, np.uint64)
            rng = np.random.Generator(np.random.Philox(key=key))
            uniforms = rng.random((_BLOCK, _UNIFORMS)).tolist()
            normals = rng.standard_normal((_BLOCK, 3)).tolist()
            self._cached = ((epoch, block), uniforms, normals)
        return self._cached[1], self._cached[2]

    def __call__(self, epoch: int, slot: int, height: int, width: int) -> SampleAugment:
        uniforms, normals = self._block(epoch, slot // _BLOCK)
        row = uniforms[slot % _BLOCK]
        top, left, h, w = random_resized_crop_window(_RowDraws(row), height, width, self.scale, self.ratio)
        tail = row[2 * RRC_ATTEMPTS + 2:]
        strength = self.color_jitter
        low, high = max(1e-3, 1.0 - strength), 1.0 + strength  # a factor of 0 would divide by zero
        jitter = tuple(low + (high - low) * u for u in tail[1:4]) if strength > 0 else (1.0, 1.0, 1.0)
        lighting = tuple(self.lighting_std * z for z in normals[slot % _BLOCK]) if self.lighting_std > 0 \
            else (0.0, 0.0, 0.0)
        box = (left / width, top / height, (left + w) / width, (top + h) / height)
        return SampleAugment(top, left, h, w, box, self.flip and tail[0] < 0.5, jitter, lighting)
