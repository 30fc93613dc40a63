"""make_shards: sources, splits, shard sizing, index, overwrite, CLI, built-in sets."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mosa_scale.data import DataSpec, MissingDatasetError, build_loader, make_shards
from mosa_scale.data.builtin import (
    fashion_mnist_available,
    load_digits_images,
    load_fashion_mnist,
    read_idx,
)
from mosa_scale.data.shards import parse_size, parse_splits, split_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "make_shards.py")


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """All samples of a shard, key -> field -> bytes, read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def read_split(out: str, split: str) -> dict[str, dict[str, bytes]]:
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    samples = {}
    for name, count in zip(index["splits"][split]["shards"], index["splits"][split]["per_shard"]):
        shard = read_tar(os.path.join(out, name))
        assert len(shard) == count
        samples.update(shard)
    return samples


def test_digits_round_trip_through_tool_and_pipeline(tmp_path):
    out = str(tmp_path / "digits")
    index = make_shards("digits", out, samples_per_shard=500, splits="train=0.8,val=0.2", seed=1, progress=False)
    digits = load_digits_images()
    assert digits.images.shape == (1797, 8, 8) and digits.images.max() == 255
    assert index["classes"] == [str(i) for i in range(10)] and index["num_classes"] == 10
    assert index["source"] == "digits"
    assert {k: v["num_samples"] for k, v in index["splits"].items()} == {"train": 1438, "val": 359}
    assert index["splits"]["train"]["per_shard"] == [500, 500, 438]
    assert index["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(3)]
    origins = []
    for split in ("train", "val"):
        for fields in read_split(out, split).values():
            meta = json.loads(fields["json"])
            i = int(meta["origin"][len("digits[") : -1])
            origins.append(i)
            pixels = np.array(Image.open(io.BytesIO(fields["png"])))
            assert np.array_equal(pixels, digits.images[i])
            assert int(fields["cls"]) == meta["label"] == digits.labels[i]
    assert sorted(origins) == list(range(1797))  # each image exactly once over the splits

    loader = build_loader(
        DataSpec(out, split="val"),
        image_size=8,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        train=False,
        batch_size=64,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        epoch=0,
    )
    val = read_split(out, "val")
    seen = 0
    for batch in loader:
        for key, ok, label, image in zip(
            batch["key"], batch["valid"].tolist(), batch["label"].tolist(), batch["image"]
        ):
            if not ok:
                continue
            i = int(json.loads(val[key]["json"])["origin"][len("digits[") : -1])
            expected = torch.from_numpy(digits.images[i]).expand(3, 8, 8)  # gray -> RGB
            assert torch.equal((image * 255).round().to(torch.uint8), expected)
            assert label == digits.labels[i]
            seen += 1
    assert seen == 359 and loader.skipped["corrupt"] == 0


def make_folder(root, with_junk: bool = True) -> dict[str, tuple[str, bytes]]:
    """cat/ and dog/ with PNG, JPEG and grayscale images; returns relpath -> (class, bytes)."""
    rng = np.random.default_rng(0)
    files = {}
    for cls, n in (("cat", 3), ("dog", 4)):
        os.makedirs(root / cls / "sub")
        for i in range(n):
            shape = (5 + i, 7, 3) if i % 2 else (6, 6)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            ext = "jpeg" if i == 2 else "png"
            rel = os.path.join(cls, "sub" if i == 3 else "", f"im.{i}.{ext}")
            image.save(root / rel, format="JPEG" if ext == "jpeg" else "PNG")
            files[rel] = (cls, (root / rel).read_bytes())
    if with_junk:
        (root / "cat" / "notes.txt").write_text("not an image")
    return files


def test_folder_source_stores_images_as_is_with_class_labels(tmp_path):
    files = make_folder(tmp_path / "imgs")
    out = str(tmp_path / "out")
    index = make_shards(str(tmp_path / "imgs"), out, samples_per_shard=3, progress=False)
    assert index["classes"] == ["cat", "dog"]
    assert index["splits"]["train"]["per_shard"] == [3, 3, 1]
    samples = read_split(out, "train")
    assert len(samples) == 7
    for fields in samples.values():
        meta = json.loads(fields["json"])
        cls, data = files[meta["origin"]]
        image_field = "jpg" if meta["origin"].endswith(".jpeg") else "png"
        assert fields[image_field] == data  # bytes stored unchanged, .jpeg -> jpg field
        assert meta["class"] == cls and int(fields["cls"]) == ["cat", "dog"].index(cls)


def test_csv_source_with_class_names_and_bad_rows_named_by_line(tmp_path):
    files = make_folder(tmp_path / "imgs", with_junk=False)
    rows = ["path,label"] + [f"imgs/{rel},{cls}" for rel, (cls, _) in sorted(files.items())]
    (tmp_path / "good.csv").write_text("\n".join(rows) + "\n")
    index = make_shards(str(tmp_path / "good.csv"), str(tmp_path / "out"), progress=False)
    assert index["classes"] == ["cat", "dog"] and index["splits"]["train"]["num_samples"] == 7
    for fields in read_split(str(tmp_path / "out"), "train").values():
        meta = json.loads(fields["json"])
        assert meta["class"] == files[meta["origin"][len("imgs/") :]][0]

    bad = rows[:2] + ["imgs/missing.png,cat", rows[2] + ",extra", "notes.txt,dog", ",cat"]
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError) as err:
        make_shards(str(tmp_path / "bad.csv"), str(tmp_path / "out2"), progress=False)
    message = str(err.value)
    assert "4 bad row(s)" in message
    for line, what in ((3, "does not exist"), (4, "expected 2 columns"), (5, "is not a jpg"), (6, "empty path")):
        assert f"line {line}: " in message and what in message
    assert not os.path.exists(tmp_path / "out2")  # nothing written on error


def test_integer_csv_labels_are_class_indices(tmp_path):
    files = make_folder(tmp_path / "imgs", with_junk=False)
    rows = [f"imgs/{rel},{2 if cls == 'dog' else 0}" for rel, (cls, _) in sorted(files.items())]
    (tmp_path / "l.csv").write_text("\n".join(rows))
    index = make_shards(str(tmp_path / "l.csv"), str(tmp_path / "out"), progress=False)
    assert index["classes"] == ["0", "1", "2"]
    labels = sorted(int(f["cls"]) for f in read_split(str(tmp_path / "out"), "train").values())
    assert labels == [0, 0, 0, 2, 2, 2, 2]


def test_shards_respect_sample_and_byte_limits(tmp_path):
    out = str(tmp_path / "out")
    index = make_shards("digits", out, samples_per_shard=40, max_shard_bytes=30 * 1024, limit=200, progress=False)
    split = index["splits"]["train"]
    assert sum(split["per_shard"]) == 200 and len(split["shards"]) > 200 // 40
    for name, count, size in zip(split["shards"], split["per_shard"], split["bytes"]):
        path = os.path.join(out, name)
        assert os.path.getsize(path) == size <= 30 * 1024
        assert len(read_tar(path)) == count <= 40
    index = make_shards("digits", out, samples_per_shard=40, limit=200, overwrite=True, progress=False)
    assert index["splits"]["train"]["per_shard"] == [40] * 5
    assert sorted(os.listdir(out)) == ["index.json"] + [f"train-{i:06d}.tar" for i in range(5)]


def test_same_seed_gives_identical_shards_other_seed_another_split(tmp_path):
    def build(name, seed):
        make_shards("digits", str(tmp_path / name), splits="train=0.5,val=0.5", seed=seed, limit=100, progress=False)
        return {n: (tmp_path / name / n).read_bytes() for n in os.listdir(tmp_path / name)}

    a, b, c = build("a", 3), build("b", 3), build("c", 4)
    assert a == b
    assert a["val-000000.tar"] != c["val-000000.tar"]


def test_refuses_to_overwrite_unless_asked_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "out"
    make_shards("digits", str(out), limit=50, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards("digits", str(out), limit=50, progress=False)
    (out / "README.txt").write_text("mine")
    make_shards("digits", str(out), limit=20, splits="val=1", overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["README.txt", "index.json", "val-000000.tar"]


def test_cli_writes_shards_shows_progress_and_fails_cleanly(tmp_path, capsys):
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        TOOL,
        "digits",
        "--out",
        out,
        "--samples-per-shard",
        "100",
        "--split",
        "train=0.75,val=0.25",
        "--seed",
        "5",
        "--limit",
        "400",
        "--max-shard-bytes",
        "1M",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "train: 300 samples in 3 shards" in done.stdout and "100%" in done.stderr
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f)["splits"]["val"]["per_shard"] == [100]
    (tmp_path / "empty").mkdir()
    tool = load_tool()  # the error paths, in-process (a subprocess costs seconds of imports)
    for argv, message in (
        ([*cmd[2:]], "pass --overwrite"),
        ([str(tmp_path / "nope"), "--out", out + "2"], "is neither a folder"),
        ([str(tmp_path / "empty"), "--out", out + "3"], "no class sub-folders"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def load_tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_and_size_parsing():
    assert parse_splits("train=0.8,val=0.2") == {"train": 0.8, "val": 0.2}
    assert split_sizes(1797, {"train": 0.8, "val": 0.2}) == {"train": 1438, "val": 359}
    assert split_sizes(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    for bad, why in (
        ("train=0.8", "sum to 0.8"),
        ("train=0.5,train=0.5", "unique"),
        ("tr.ain=1", "letters"),
        ("train=x", "not a number"),
        ("a=0,b=1", "(0, 1]"),
    ):
        with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
            parse_splits(bad)
    assert parse_size("512K") == 512 * 1024 and parse_size("1e6") == 10**6
    assert parse_size("2G") == 2 * 1024**3
    with pytest.raises(ValueError, match="bad size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="no sample"):
        make_shards("digits", "/nonexistent/never", splits="a=0.999,b=0.001", limit=10, progress=False)


def test_read_idx_plain_and_gzipped(tmp_path):
    import gzip

    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    raw += array.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "b-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(str(tmp_path / "a-idx3-ubyte")), array)
    assert np.array_equal(read_idx(str(tmp_path / "b-idx3-ubyte.gz")), array)
    (tmp_path / "c").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(tmp_path / "c"))


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(MissingDatasetError, match=r"dataset-fashion-mnist.*apt-get install"):
        load_fashion_mnist(root=str(tmp_path))
    assert not fashion_mnist_available(str(tmp_path))


@pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Debian package dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_fashion_mnist_from_the_debian_package(tmp_path):
    data = load_fashion_mnist()
    assert data.images.shape == (70000, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels[:60000]).tolist() == [6000] * 10  # balanced train set
    assert np.bincount(data.labels[60000:]).tolist() == [1000] * 10
    out = str(tmp_path / "fm")
    index = make_shards(
        "fashion-mnist", out, limit=300, samples_per_shard=100, splits="train=0.5,val=0.5", progress=False
    )
    assert index["classes"][0] == "T-shirt/top" and index["num_classes"] == 10
    for fields in read_split(out, "val").values():
        i = int(json.loads(fields["json"])["origin"][len("fashion-mnist[") : -1])
        assert np.array_equal(np.array(Image.open(io.BytesIO(fields["png"]))), data.images[i])
        assert int(fields["cls"]) == data.labels[i]
