"""Batch-wise augmentation with tensor ops, for the device-resident loader (any device).

The uint8 store is HWC, (N, 32 + 2p, 32 + 2p, 3), zero-padded once at load, so one training
batch costs two passes over memory:

1. `gather_crop_flip`: a single `index_select` of pixels reads the batch's samples, the random
   translate (a crop of the padded image, i.e. the padded random crop of the DataLoader path) and
   the horizontal flip (reversed column index) at once, into a uint8 (B, 32, 32, 3) tensor.
2. `normalise`: uint8 -> dtype, (x - mean) / std, and the memory format (NCHW contiguous or
   channels_last) in one `addcmul` that writes straight into the output tensor.

Cutout (`cutout_`) is one more in-place masked fill of the output when enabled. Random
parameters come from `draw_params`, a whole epoch at a time from a `torch.Generator`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from cifar_dist.data.augment import mean_std

SIZE = 32  # CIFAR image side, pixels
_CHUNK = 8192  # images copied host -> device at once (bounds the host temporary to ~25 MB)


@dataclass(frozen=True)
class AugParams:
    """Per-sample random parameters of one epoch (or a slice of it), all on the store's device.

    dy, dx: int64 crop offsets in 0..2p into the padded image (p = translate padding);
    flip: bool, mirror left-right; cy, cx: int64 cutout square centres in 0..31.
    """

    dy: Tensor
    dx: Tensor
    flip: Tensor
    cy: Tensor
    cx: Tensor

    def __getitem__(self, sl: slice | Tensor) -> AugParams:
        return AugParams(self.dy[sl], self.dx[sl], self.flip[sl], self.cy[sl], self.cx[sl])


def load_store(images: np.ndarray, pad: int, device: torch.device) -> Tensor:
    """uint8 (N, 32, 32, 3) host array (memmap ok) -> zero-padded (N, 32+2p, 32+2p, 3) on device.

    Copied in chunks: no full-size host temporary, and np.array makes each chunk writable, so a
    read-only memmap does not trigger torch's non-writable-array warning.
    """
    n = len(images)
    side = SIZE + 2 * pad
    store = torch.zeros((n, side, side, 3), dtype=torch.uint8, device=device)
    for i in range(0, n, _CHUNK):
        chunk = torch.from_numpy(np.array(images[i : i + _CHUNK], dtype=np.uint8))
        store[i : i + len(chunk), pad : pad + SIZE, pad : pad + SIZE] = chunk.to(device)
    return store


def draw_params(
    n: int, pad: int, *, flip: Tensor | None, generator: torch.Generator, device: torch.device
) -> AugParams:
    """Random parameters for n samples. `flip`: a precomputed mask (alternating flip, or all
    False when flipping is off); None draws a fair coin per sample."""
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=device)
    if flip is None:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
    cy, cx = torch.randint(0, SIZE, (2, n), generator=generator, device=device)
    return AugParams(dy, dx, flip, cy, cx)


def alternating_flip(base: Tensor, indices: Tensor, epoch: int) -> Tensor:
    """airbench's alternating flip: sample i is flipped iff base[i] XOR (epoch is odd).

    `base` is one fair coin per sample of the whole split, drawn once from the run seed (the
    same on every rank), so each image is seen mirrored in exactly every other epoch wherever the
    shuffle puts it; this removes the redundancy of random flips (Jordan 2024, airbench).
    """
    return base[indices] ^ bool(epoch % 2)


def gather_crop_flip(store: Tensor, indices: Tensor, params: AugParams) -> Tensor:
    """One pass: uint8 (B, 32, 32, 3) crops (store[i, dy:dy+32, dx:dx+32], mirrored when flip).

    A flat per-pixel index plus `index_select` over (N*H*W, 3) pixel rows: ~5x faster on CPU than
    the equivalent 3-tensor advanced indexing, and a plain gather kernel on CUDA.
    """
    n, h, w, c = store.shape
    ar = torch.arange(SIZE, device=store.device)
    rows = params.dy[:, None] + ar  # (B, 32)
    cols = params.dx[:, None] + torch.where(params.flip[:, None], SIZE - 1 - ar, ar)  # (B, 32)
    flat = indices[:, None, None] * (h * w) + rows[:, :, None] * w + cols[:, None, :]
    pixels = store.view(n * h * w, c).index_select(0, flat.view(-1))
    return pixels.view(len(indices), SIZE, SIZE, c)


def normalise(
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Tensor:
    """uint8 NCHW (any strides, e.g. an HWC tensor permuted) -> normalised `dtype` NCHW.

    One kernel: addcmul reads uint8, computes x * (1/(255 std)) - mean/std in float32 (the
    common dtype) and stores in `dtype` straight into an output of the requested memory format.
    """
    scale, shift = _affine(tuple(mean), tuple(std), images.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=dtype, device=images.device, memory_format=fmt)
    return torch.addcmul(shift, images, scale, out=out)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple:
    """(scale, shift) with x * scale + shift = (x / 255 - mean) / std, cached per device so a
    batch costs no host-to-device copy of constants."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


@dataclass(frozen=True)
class Normalise:
    """`normalise` with the dataset statistics and output format bound (what loaders yield)."""

    dataset: str = "cifar10"
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        mean, std = mean_std(self.dataset)  # type: ignore[arg-type]
        return normalise(images, mean, std, dtype=self.dtype, channels_last=self.channels_last)


def cutout_(images: Tensor, cy: Tensor, cx: Tensor, size: int) -> Tensor:
    """In place: zero (= the dataset mean after normalisation) a size x size square per image.

    Centred at (cy, cx) and clipped at the border, as in DeVries & Taylor (2017), whose cutout
    also fills the normalised image with 0. `images` is normalised NCHW.
    """
    ar = torch.arange(SIZE, device=images.device)
    lo_y, lo_x = cy - size // 2, cx - size // 2
    in_y = (ar >= lo_y[:, None]) & (ar < lo_y[:, None] + size)  # (B, 32)
    in_x = (ar >= lo_x[:, None]) & (ar < lo_x[:, None] + size)
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, 32, 32)
    return images.masked_fill_(mask, 0.0)


def randaugment_grouped(images: Tensor, transform: v2.RandAugment, group: int) -> Tensor:
    """transforms.v2 RandAugment on a uint8 NCHW batch, one call per group of `group` images.

    v2 ops run batched on device tensors, but one call draws a single (ops, signs) choice for
    the whole tensor it gets: calling it per group trades per-image diversity (group=1, one
    Python call per image) against speed (group=B, one choice per batch). The caller seeds the
    global CPU RNG, from which v2 draws.
    """
    if group >= len(images):
        return transform(images)
    return torch.cat([transform(chunk) for chunk in images.split(group)])


@dataclass
class GlobalMix:
    """MixUp / CutMix of one global batch, drawn from (seed, epoch, step) only.

    By hand rather than transforms.v2 MixUp/CutMix: those pair within the batch they are given
    (a rank's micro-batch) and draw one lambda per call, so the mixing would change with the
    world size. Here every sample is paired with its predecessor in the *global* batch (by
    global position in the epoch's permutation; v2's roll-by-one order) and one lambda / box is
    drawn per optimiser step; each rank gathers the partner from the whole-split store.
    """

    lam: float
    """Weight of the sample itself; for CutMix 1 - box area / image area."""
    box: tuple[int, int, int, int] | None
    """CutMix (y0, y1, x0, x1) pasted from the partner; None for MixUp."""


def draw_global_mix(mixup_alpha: float, cutmix_alpha: float, seed: int) -> GlobalMix:
    """One step's mix (torchvision's semantics: a 50/50 choice when both alphas are > 0)."""
    g = np.random.default_rng(seed)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or g.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(g.beta(alpha, alpha))
    if not use_cutmix:
        return GlobalMix(lam, None)
    cy, cx = int(g.integers(SIZE)), int(g.integers(SIZE))
    half = int(0.5 * SIZE * np.sqrt(1.0 - lam))
    y0, y1 = max(cy - half, 0), min(cy + half, SIZE)
    x0, x1 = max(cx - half, 0), min(cx + half, SIZE)
    return GlobalMix(1.0 - (y1 - y0) * (x1 - x0) / SIZE**2, (y0, y1, x0, x1))


def apply_global_mix(
    mix: GlobalMix, x: Tensor, y: Tensor, px: Tensor, py: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Mix normalised NCHW `x` (labels `y`) with its partners `px` (`py`): soft (B, C) labels."""
    if mix.box is None:
        x = x.mul(mix.lam).add_(px, alpha=1.0 - mix.lam)
    else:
        y0, y1, x0, x1 = mix.box
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = px[:, :, y0:y1, x0:x1]
    one = torch.nn.functional.one_hot(y, num_classes).float()
    other = torch.nn.functional.one_hot(py, num_classes).float()
    return x, one.mul_(mix.lam).add_(other, alpha=1.0 - mix.lam)
