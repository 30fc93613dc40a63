"""Reading raw samples from real tar shards: webdataset's grouping and shard draws, our counts."""

from __future__ import annotations

import io
import os
import tarfile

from mosa_scale.data import build_loader
from mosa_scale.data.reader import SkipCounts, iter_shard, resampled_samples

EVAL = dict(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """A tar file holding `members` in the given order (tarfile allows repeated names)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_duplicate_field_is_a_read_error_of_its_shard(shard_set):
    # webdataset's group_by_keys refuses s0-002 (two cls members): the samples before it are
    # delivered, the rest of the shard is one bad shard with its unread samples missing.
    data = shard_set([4], index=False)
    url = data["urls"][0]
    with tarfile.open(url) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    at = next(i for i, (name, _) in enumerate(members) if name == "s0-002.cls")
    write_tar(url, members[: at + 1] + [("s0-002.cls", b"1")] + members[at + 1 :])
    counts = SkipCounts()
    samples = list(iter_shard(url, 4, counts))
    assert [s["__key__"] for s in samples] == ["s0-000", "s0-001"]
    assert all(s["__url__"] == url for s in samples)
    assert samples[1]["cls"] == str(data["samples"]["s0-001"][0]).encode()
    assert counts.pop() == {"corrupt": 0, "missing": 2, "bad_shards": 1, "extra": 0}
    # The loader plans 4 samples from the index and reports the same loss.
    with open(os.path.join(data["dir"], "index.json"), "w") as f:
        f.write('{"splits": {"train": {"shards": ["train-000000.tar"], "per_shard": [4]}}}')
    loader = build_loader(
        data["pattern"], **EVAL, train=False, batch_size=4, rank=0, world_size=1, num_workers=0, seed=0, epoch=0
    )
    (batch,) = list(loader)
    assert batch["key"] == ["s0-000", "s0-001", "", ""] and batch["valid"].tolist() == [True, True, False, False]
    assert loader.skipped == {"corrupt": 0, "missing": 2, "bad_shards": 1, "extra": 0}


def test_resampled_draws_take_url_lists_verbatim_and_depend_on_the_seed(shard_set):
    # A brace in a list entry is part of the file name, not a pattern to expand.
    data = shard_set([3, 2])
    braced = os.path.join(data["dir"], "b{0..1}.tar")
    os.rename(data["urls"][1], braced)
    urls = [f"pipe:cat {data['urls'][0]}", f"pipe:cat '{braced}'"]

    def keys(seed: int, n: int = 40) -> list[str]:
        counts = SkipCounts()
        stream = resampled_samples(urls, [3, 2], seed, counts)
        out = [str(next(stream)["__key__"]) for _ in range(n)]
        assert counts.pop() == {"corrupt": 0, "missing": 0, "bad_shards": 0, "extra": 0}
        return out

    drawn = keys(5)
    assert set(drawn) == set(data["samples"])  # both shards are read, the braced one whole
    assert keys(5) == drawn and keys(6) != drawn


def test_resampled_reader_stops_after_two_rounds_of_empty_draws(tmp_path):
    urls = [str(tmp_path / "gone-0.tar"), str(tmp_path / "gone-1.tar"), str(tmp_path / "gone-2.tar")]
    counts = SkipCounts()
    assert list(resampled_samples(urls, [2, 3, 4], 0, counts)) == []
    popped = counts.pop()
    assert popped["bad_shards"] == 6 and popped["corrupt"] == popped["extra"] == 0
    assert 12 <= popped["missing"] <= 24  # 6 draws of shards promising 2 to 4 samples
