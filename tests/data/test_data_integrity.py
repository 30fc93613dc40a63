"""Nothing half-written is read, nothing out of range reaches the loss: make_shards interrupted in
the middle of a shard or stopped by a bad source file leaves nothing, readers refuse shards their
index does not list, and labels outside [0, num_classes) are skipped, counted and named."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mosa_scale.data import DataError, DataSpec, SourceError, build_loader, make_shards, resolve_shards
from mosa_scale.engine.launch import repo_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "make_shards.py")
EVAL = dict(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def bmp_folder(root, per_class: int = 300, side: int = 96) -> str:
    """Class folders of BMP files: make_shards re-encodes each as PNG, so writing takes a while."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                os.path.join(root, c, f"{i:04d}.bmp")
            )
    return str(root)


def test_sigint_in_the_middle_of_a_shard_leaves_no_file(tmp_path):
    src, out = bmp_folder(tmp_path / "src"), str(tmp_path / "out")
    proc = subprocess.Popen(
        [sys.executable, TOOL, src, "--out", out, "--samples-per-shard", "100", "--quiet"],
        env=repo_env(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that starts jobs in the background ignores SIGINT in them, and Python then never
        # turns it into KeyboardInterrupt: give the tool the default, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    stopped_mid_shard = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(out) if os.path.isdir(out) else []
        if any(n.endswith(".tar") for n in names) and any(n.endswith(".tar.tmp") for n in names):
            proc.send_signal(signal.SIGSTOP)
            names = os.listdir(out)
            if any(n.endswith(".tar.tmp") for n in names):  # frozen with a shard half written
                stopped_mid_shard = True
                proc.send_signal(signal.SIGINT)
                proc.send_signal(signal.SIGCONT)
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=60)
    assert stopped_mid_shard, "make_shards finished before it could be interrupted"
    assert sorted(names)[0].endswith(".tar")  # a finished shard existed when it was interrupted
    assert proc.returncode == 130 and "interrupted" in stderr, stderr[-2000:]
    assert os.listdir(out) == []  # no shard (finished or partial), no .tmp, no index


def test_a_bad_source_file_is_named_and_nothing_is_left(tmp_path):
    src = bmp_folder(tmp_path / "src", per_class=150, side=16)
    garbage = os.path.join(src, "b", "0075.bmp")
    with open(garbage, "wb") as f:
        f.write(b"not an image at all" * 10)
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("kept")
    with pytest.raises(SourceError, match=f"source file {garbage} cannot be read as an image"):
        make_shards(src, out, samples_per_shard=50, overwrite=True, progress=False)
    assert os.listdir(out) == ["notes.txt"]
    for name in ("0010.jpg", "0011.png"):  # stored formats are checked too
        shutil.copy(garbage, os.path.join(src, "a", name))
    os.remove(garbage)
    proc = subprocess.run(
        [sys.executable, TOOL, src, "--out", out, "--overwrite", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env=repo_env(ROOT),
    )
    assert proc.returncode == 2 and "cannot be read as an image" in proc.stderr and "Traceback" not in proc.stderr
    assert os.path.join(src, "a", "0010.jpg") in proc.stderr or os.path.join(src, "a", "0011.png") in proc.stderr
    assert os.listdir(out) == ["notes.txt"]


def test_shards_missing_from_a_present_index_are_refused(shard_set):
    data = shard_set([4, 4, 4])
    stray = os.path.join(data["dir"], "train-000003.tar")
    shutil.copy(data["urls"][0], stray)  # e.g. a partial shard of an interrupted writer
    pattern = os.path.join(data["dir"], "train-{000000..000003}.tar")
    with pytest.raises(DataError, match=r"1 shard\(s\) are not listed in .*index.json: .*train-000003.tar"):
        resolve_shards(pattern)
    assert resolve_shards(DataSpec(pattern, allow_unindexed=True)).sizes == (4, 4, 4, 4)  # told otherwise


def test_labels_outside_num_classes_are_skipped_counted_and_named(shard_set, caplog):
    data = shard_set([6, 6])  # labels 0..4
    labels = {k: label for k, (label, _) in data["samples"].items()}
    caplog.set_level(logging.WARNING, logger="mosa_scale.data.pipeline")
    loader = build_loader(
        data["pattern"],
        **EVAL,
        train=False,
        batch_size=4,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        epoch=0,
        num_classes=3,
    )
    batches = list(loader)
    valid = {k: int(y) for b in batches for k, y, ok in zip(b["key"], b["label"].tolist(), b["valid"].tolist()) if ok}
    bad = sorted(k for k, label in labels.items() if label >= 3)
    assert bad and valid == {k: label for k, label in labels.items() if label < 3}
    assert loader.skipped["corrupt"] == len(bad)
    for k in bad:
        shard = data["urls"][int(k[1])]
        assert f"skipping sample {k} of shard {shard}: label {labels[k]} is outside [0, num_classes=3)" in caplog.text
