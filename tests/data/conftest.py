"""Fixtures: real webdataset tar shards with known images, labels and sizes in tmp_path."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class ShardSetFactory:
    """Writes `<prefix>-%06d.tar` shards of random RGB PNGs and an index.json like make_shards."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __call__(
        self,
        sizes: Sequence[int],
        *,
        name: str = "set",
        prefix: str = "train",
        side: int = 8,
        index: bool = True,
        seed: int = 0,
        extra: Callable[[int, int, dict], dict] | None = None,
    ) -> dict:
        """Returns {"dir", "pattern", "urls", "samples": {key: (label, pixels)}}."""
        folder = os.path.join(self.root, name)
        os.makedirs(folder)
        rng = np.random.default_rng(seed)
        samples, urls = {}, []
        for s, size in enumerate(sizes):
            url = os.path.join(folder, f"{prefix}-{s:06d}.tar")
            urls.append(url)
            with TarWriter(url, encoder=False, mtime=0) as writer:
                for i in range(size):
                    key = f"s{s}-{i:03d}"
                    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                    label = int(rng.integers(0, 5))
                    sample = {"__key__": key, "png": png_bytes(pixels), "cls": str(label).encode()}
                    if extra is not None:
                        sample = extra(s, i, sample)
                    writer.write(sample)
                    samples[key] = (label, pixels)
        if index:
            with open(os.path.join(folder, "index.json"), "w") as f:
                json.dump(
                    {
                        "splits": {
                            prefix: {
                                "shards": [os.path.basename(u) for u in urls],
                                "num_samples": sum(sizes),
                                "per_shard": list(sizes),
                            }
                        },
                        "classes": [str(i) for i in range(5)],
                        "num_classes": 5,
                        "source": "test",
                    },
                    f,
                )
        last = len(sizes) - 1
        return {
            "dir": folder,
            "urls": urls,
            "samples": samples,
            "pattern": os.path.join(folder, f"{prefix}-{{000000..{last:06d}}}.tar"),
        }


@pytest.fixture
def shard_set(tmp_path) -> ShardSetFactory:
    return ShardSetFactory(str(tmp_path))


def truncate_in_sample(url: str, key: str) -> None:
    """Cut the tar file in the middle of the data of the last member of sample `key`."""
    with tarfile.open(url) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(key + ".")]
    last = max(members, key=lambda m: m.offset_data)
    with open(url, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)


@pytest.fixture
def truncate() -> Callable[[str, str], None]:
    return truncate_in_sample
