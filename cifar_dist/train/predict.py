"""`cifar-dist predict --checkpoint PATH IMAGE...`: top-k classes of image files.

The model and its config come from the checkpoint (as for `cifar-dist eval`); images are decoded
by torchvision (PNG, JPEG, ... via PIL when torchvision's decoders refuse), converted to RGB,
resized to 32x32 when they are not, and normalised with the evaluation transform of the
checkpoint's dataset. An image that cannot be read gets one error line; the others are still
classified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cifar_dist.data.errors import DataError


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]
    """(class name, probability), most likely first."""

    def line(self) -> str:
        return f"{self.image}: " + ", ".join(f"{name} {p:.3f}" for name, p in self.top)


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 (3, 32, 32) RGB tensor of an image file; DataError naming the file otherwise."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    try:
        img = decode_image(str(p), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        img = _read_with_pil(p)  # formats torchvision's decoders lack (BMP, TIFF, ...)
    if tuple(img.shape[-2:]) != (32, 32):
        img = v2.Resize((32, 32), antialias=True)(img)
    return img


def _read_with_pil(p: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    try:
        with Image.open(p) as im:
            return F.pil_to_tensor(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{p}: not a readable image ({type(e).__name__})") from None


def load_model(checkpoint: str | Path, use_ema: bool = True) -> tuple[torch.nn.Module, object]:
    """(model in eval mode on the CPU, its Config) from a checkpoint file or DeepSpeed dir."""
    from cifar_dist.config.load import config_from_dict
    from cifar_dist.train.checkpoint import load_checkpoint
    from cifar_dist.train.common import build_model
    from cifar_dist.train.eval_checkpoint import _ema_weights

    if Path(checkpoint).is_dir():
        from cifar_dist.deepspeed.checkpoint import consolidate

        ckpt = consolidate(Path(checkpoint))
    else:
        ckpt = load_checkpoint(Path(checkpoint))
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(
        _ema_weights(ckpt["ema"]) if use_ema and ckpt.get("ema") else ckpt["model"]
    )
    return model.eval(), cfg


@torch.no_grad()
def predict(
    checkpoint: str | Path, images: list[str], top_k: int = 3, use_ema: bool = True
) -> tuple[list[Prediction], list[str]]:
    """(predictions for the readable images, one error line per unreadable one)."""
    from cifar_dist.data.augment import eval_transform
    from cifar_dist.data.synth import class_names

    model, cfg = load_model(checkpoint, use_ema)
    names = class_names(cfg.data.dataset)
    transform = eval_transform(cfg.data.dataset)
    dtype = next(model.parameters()).dtype
    out: list[Prediction] = []
    errors: list[str] = []
    for image in images:
        try:
            x = transform(read_image(image)).unsqueeze(0).to(dtype)
        except DataError as e:
            errors.append(str(e))
            continue
        probs = torch.softmax(model(x).float(), dim=1)[0]
        p, idx = probs.topk(min(top_k, len(names)))
        out.append(Prediction(image, [(names[i], float(v)) for v, i in zip(p, idx.tolist())]))
    return out, errors
