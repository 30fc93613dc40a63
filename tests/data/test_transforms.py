"""The training crop: torchvision's RandomResizedCrop parameters, seeded per sample."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mosa_scale.data.transforms import ImageTransform


def image(side_w: int = 40, side_h: int = 30) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (side_h, side_w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_crop_box_is_a_function_of_the_sample_rng_and_leaves_torch_rng_alone():
    t = ImageTransform(size=8, train=True, crop_scale=(0.2, 1.0))
    torch.manual_seed(123)
    before, seed = torch.get_rng_state(), torch.initial_seed()
    boxes = [t._crop_box(image(), random.Random(s)) for s in range(20)]
    out = t(image(), random.Random(3))
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == seed
    assert boxes == [t._crop_box(image(), random.Random(s)) for s in range(20)]  # same seed, same crop
    assert len(set(boxes)) == 20  # different seeds, different crops
    for top, left, h, w in boxes:
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w
        assert 0.2 * 1200 * 0.9 <= h * w <= 1200 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    assert torch.equal(out, t(image(), random.Random(3)))
    assert not torch.equal(out, t(image(), random.Random(4)))


def test_crop_box_follows_torchvision_get_params_on_the_seeded_generator():
    t = ImageTransform(size=8, train=True, crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
    rng = random.Random(11)
    box = t._crop_box(image(), rng)
    torch.manual_seed(random.Random(11).getrandbits(63))
    assert box == RandomResizedCrop.get_params(image(), [0.3, 0.9], [0.5, 2.0])
