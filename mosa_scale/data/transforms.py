"""Decoding and preprocessing of one sample: image bytes -> RGB crop, label fields -> int.

Augmentation draws its parameters from a `random.Random` passed in by the caller (seeded from
seed, epoch, rank, worker and stream position), so that a resumed run augments every sample
exactly as the uninterrupted run did. The crop box is torchvision's
`RandomResizedCrop.get_params`, which draws from torch's CPU generator: it runs on a fork of
that generator seeded from the sample's `random.Random`, leaving the trainer's torch stream
(dropout, DataLoader seeds) untouched.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from webdataset.autodecode import imagehandler

__all__ = [
    "CorruptSample",
    "IMAGE_FIELDS",
    "LABEL_FIELDS",
    "ImageTransform",
    "decode_image",
    "parse_label",
]

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LABEL_FIELDS = ("cls", "txt", "json")
_DECODE_RGB = imagehandler("pilrgb", IMAGE_FIELDS)  # webdataset's PIL decoder: open, load, convert


class CorruptSample(ValueError):
    """A sample that cannot be used: undecodable image or missing/invalid label."""


def _as_int(text: str, field: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise CorruptSample(f"{field} label {text.strip()[:40]!r} is not an integer") from None
    if value < 0:
        raise CorruptSample(f"{field} label {value} is negative")
    return value


def parse_label(sample: Mapping[str, bytes]) -> int:
    """Class index of a raw sample, from the first present field of `cls`, `txt`, `json`.

    Args:
        sample: Raw sample: field extension -> bytes.

    Returns:
        The class index.

    Raises:
        CorruptSample: No label field, or one that does not hold a non-negative integer
            (`json` must be an object with an integer "label").
    """
    for field in LABEL_FIELDS:
        if field not in sample:
            continue
        try:
            text = sample[field].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptSample(f"{field} label is not UTF-8") from None
        if field != "json":
            return _as_int(text, field)
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exn:
            raise CorruptSample(f"json label is not valid JSON: {exn}") from None
        label = meta.get("label") if isinstance(meta, dict) else None
        if not isinstance(label, int) or isinstance(label, bool):
            raise CorruptSample("json field has no integer 'label'")
        return _as_int(str(label), field)
    raise CorruptSample(f"no label field (one of {', '.join(LABEL_FIELDS)})")


def decode_image(sample: Mapping[str, bytes]) -> Image.Image:
    """Decode the first image field (jpg, jpeg, png, webp) to an RGB PIL image.

    Grayscale, palette and alpha images are converted to RGB.

    Args:
        sample: Raw sample: field extension -> bytes.

    Returns:
        The decoded RGB image.

    Raises:
        CorruptSample: No image field, or bytes that PIL cannot decode completely.
    """
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise CorruptSample(f"no image field (one of {', '.join(IMAGE_FIELDS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _DECODE_RGB(field, sample[field])  # loads now: truncated data raises here, not in a transform
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exn:
        raise CorruptSample(f"undecodable {field}: {exn}") from None


@dataclass(frozen=True)
class ImageTransform:
    """Train: RandomResizedCrop + horizontal flip; eval: resize shorter side + center crop.

    Attributes:
        size: Output height and width (the backbone's input size).
        train: Augment (True) or take the deterministic eval view (False).
        crop_scale: Area range of the random crop.
        crop_ratio: Aspect ratio range of the random crop.
        hflip: Flip horizontally with probability 0.5 in training.
        interpolation: "bilinear" or "bicubic".
    """

    size: int
    train: bool
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: str = "bicubic"

    def _crop_box(self, image: Image.Image, rng: random.Random) -> tuple[int, int, int, int]:
        # torchvision's draws, made a function of `rng` alone: a forked CPU generator seeded from
        # it (default_generator only: torch.manual_seed would reseed CUDA's generators too).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng.getrandbits(63))
            return RandomResizedCrop.get_params(image, list(self.crop_scale), list(self.crop_ratio))

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        """Crop and resize one image.

        Args:
            image: RGB image.
            rng: Source of the augmentation parameters (unused in eval).

        Returns:
            uint8 tensor (3, size, size).
        """
        mode = InterpolationMode(self.interpolation)
        if self.train:
            top, left, h, w = self._crop_box(image, rng)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=mode, antialias=True)
            if self.hflip and rng.random() < 0.5:
                image = TF.hflip(image)
        else:
            image = TF.resize(image, [self.size], interpolation=mode, antialias=True)
            image = TF.center_crop(image, [self.size, self.size])
        return TF.pil_to_tensor(image)  # (H, W, 3) PIL -> (3, H, W) uint8
