"""The streaming pipeline on real tar shards: coverage, equal batch counts, bad data, resume."""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch

from mosa_scale.data import IGNORE_INDEX, DataSpec, build_loader, next_epoch, resolve_shards
from mosa_scale.data.plan import plan_epoch, resume_point, round_robin
from mosa_scale.data.spec import count_shard_samples, shard_name

EVAL = dict(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
UNEVEN = [9, 3, 14, 5, 1, 8, 6, 2]  # 48 samples in 8 shards of very different sizes


def loader(spec, **kw):
    args = dict(EVAL, train=True, batch_size=4, rank=0, world_size=1, num_workers=0, seed=0, epoch=0, resampled=False)
    args.update(kw)
    return build_loader(spec, **args)


def run(spec, **kw) -> tuple[list[dict], dict]:
    ld = loader(spec, **kw)
    batches = list(ld)
    return batches, ld.skipped


def valid_keys(batches) -> list[str]:
    return [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]


def test_two_ranks_two_workers_see_every_sample_once_with_equal_batch_counts(shard_set):
    data = shard_set(UNEVEN)
    spec = DataSpec(data["pattern"], shuffle_buffer=5)
    per_rank = [run(spec, rank=r, world_size=2, num_workers=2)[0] for r in (0, 1)]
    plans = [loader(spec, rank=r, world_size=2, num_workers=2) for r in (0, 1)]
    counts = [len(b) for b in per_rank]
    assert counts[0] == counts[1] == plans[0].num_batches == plans[1].num_batches
    keys = [valid_keys(b) for b in per_rank]
    assert len(keys[0]) != len(keys[1])  # uneven shards: one rank had to pad
    seen = Counter(keys[0] + keys[1])
    assert sorted(seen) == sorted(data["samples"]) and set(seen.values()) == {1}
    for batches in per_rank:
        for b in batches:
            assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
            assert b["label"].dtype == torch.int64 and b["valid"].dtype == torch.bool
            for key, label, ok, image in zip(b["key"], b["label"].tolist(), b["valid"].tolist(), b["image"]):
                if ok:
                    assert label == data["samples"][key][0]
                else:  # padding: ignored by the loss, zero image, empty key
                    assert (key, label) == ("", IGNORE_INDEX) and not image.any()


def test_eval_reads_in_shard_order_and_round_trips_pixels(shard_set):
    data = shard_set([3, 4, 2])
    batches, _ = run(DataSpec(data["pattern"]), train=False, batch_size=5)
    assert valid_keys(batches) == list(data["samples"])  # no shuffle in eval
    assert [b["valid"].sum().item() for b in batches] == [5, 4]
    for b in batches:
        for key, ok, image in zip(b["key"], b["valid"].tolist(), b["image"]):
            if ok:  # resize to the same size and center crop are the identity
                expected = torch.from_numpy(data["samples"][key][1]).permute(2, 0, 1)
                assert torch.equal((image * 255).round().to(torch.uint8), expected)


def test_normalisation_uses_mean_and_std(shard_set):
    data = shard_set([2])
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    (batch,), _ = run(data["pattern"], train=False, batch_size=2, mean=mean, std=std)
    raw = torch.from_numpy(data["samples"][batch["key"][0]][1]).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(batch["image"][0], expected, atol=1e-6)


def test_same_seed_and_epoch_repeat_exactly_other_epoch_differs(shard_set):
    data = shard_set(UNEVEN)
    a, _ = run(data["pattern"], num_workers=2, image_size=6)
    b, _ = run(data["pattern"], num_workers=2, image_size=6)
    c, _ = run(data["pattern"], num_workers=2, image_size=6, epoch=1)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]
    assert sorted(valid_keys(a)) == sorted(valid_keys(c))


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(shard_set):
    data = shard_set([4, 4, 4])
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot feed 2 rank\(s\) x 2 worker"):
        loader(data["pattern"], world_size=2, num_workers=2)
    assert loader(data["pattern"], world_size=2, num_workers=2, resampled=True).num_batches == 2


def corrupt_set(shard_set, truncate, index: bool = True):
    """4 shards of 6; s1-002 has garbage image bytes, s3-004 no label, s2 cut inside s2-003."""

    def spoil(s, i, sample):
        if (s, i) == (1, 2):
            sample["png"] = b"\x89PNG not really an image"
        if (s, i) == (3, 4):
            del sample["cls"]
        return sample

    data = shard_set([6, 6, 6, 6], extra=spoil, index=index)
    truncate(data["urls"][2], "s2-003")
    lost = {"s1-002", "s3-004", "s2-003", "s2-004", "s2-005"}
    return data, lost


@pytest.mark.parametrize("world_size", [1, 2])
def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted_exactly(shard_set, truncate, world_size):
    data, lost = corrupt_set(shard_set, truncate)
    keys, totals, nbatches = [], Counter(), set()
    for rank in range(world_size):
        batches, skipped = run(data["pattern"], rank=rank, world_size=world_size, num_workers=2, batch_size=3)
        keys += valid_keys(batches)
        totals.update(skipped)
        nbatches.add(len(batches))
        per_batch = Counter()  # counts came back from worker processes inside the batches
        for b in batches:
            per_batch.update(b["skipped"])
        assert per_batch == Counter(skipped)
    assert len(nbatches) == 1
    assert sorted(keys) == sorted(set(data["samples"]) - lost)
    assert dict(totals) == {"corrupt": 2, "missing": 3, "bad_shards": 1, "extra": 0}


def test_skips_are_logged_with_the_shard_name(shard_set, truncate, caplog):
    data, _ = corrupt_set(shard_set, truncate)
    with caplog.at_level(logging.WARNING, logger="mosa_scale.data"):
        run(data["pattern"])
    text = caplog.text
    assert "train-000002.tar" in text and "3 of 6 samples lost" in text
    assert "s1-002" in text and "train-000001.tar" in text and "undecodable png" in text
    assert "s3-004" in text and "no label field" in text


def test_truncated_shard_without_index_counts_the_partial_sample(shard_set, truncate):
    data, _ = corrupt_set(shard_set, truncate, index=False)
    assert resolve_shards(data["pattern"]).sizes == (6, 6, 4, 6)  # headers of s2-003 survive
    _, skipped = run(data["pattern"])
    assert skipped == {"corrupt": 2, "missing": 1, "bad_shards": 1, "extra": 0}


def test_pipe_shards_read_like_local_files_and_a_failing_command_is_counted(shard_set):
    data = shard_set([5, 3, 4])
    index = os.path.join(data["dir"], "index.json")
    pipes = DataSpec(tuple(f"pipe:cat {u}" for u in data["urls"]), index=index)
    local, _ = run(data["pattern"], num_workers=2, world_size=1)
    piped, skipped = run(pipes, num_workers=2)
    assert [b["key"] for b in piped] == [b["key"] for b in local]
    assert skipped == {"corrupt": 0, "missing": 0, "bad_shards": 0, "extra": 0}
    os.rename(data["urls"][1], data["urls"][1] + ".gone")
    broken, skipped = run(pipes, num_workers=2)
    assert skipped == {"corrupt": 0, "missing": 3, "bad_shards": 1, "extra": 0}
    assert sorted(valid_keys(broken)) == sorted(k for k in data["samples"] if k[:2] != "s1")


@pytest.mark.parametrize("actual,indexed", [([4, 4], [3, 4]), ([4, 5], [4, 4])])
def test_stale_index_extra_samples_are_counted_not_used(shard_set, actual, indexed):
    # The second case fills the last batch exactly: the extra sample is only seen because the
    # reader reads its last shard to the end before yielding the last batch.
    data = shard_set(actual)
    path = os.path.join(data["dir"], "index.json")
    with open(path) as f:
        index = json.load(f)
    index["splits"]["train"]["per_shard"] = indexed
    with open(path, "w") as f:
        json.dump(index, f)
    batches, skipped = run(data["pattern"], train=False)
    assert skipped["extra"] == 1 and len(valid_keys(batches)) == sum(indexed)


def test_label_field_order_cls_then_txt_then_json(shard_set):
    def fields(s, i, sample):
        del sample["cls"]
        if i == 0:  # all three: cls wins
            sample.update(cls=b"3", txt=b"1", json=json.dumps({"label": 2}).encode())
        elif i == 1:
            sample.update(txt=b" 4\n", json=json.dumps({"label": 2}).encode())
        elif i == 2:
            sample.update(json=json.dumps({"label": 2, "class": "two"}).encode())
        else:
            sample.update(json=b'{"name": "no label"}')
        return sample

    data = shard_set([4], extra=fields)
    (batch,), skipped = run(data["pattern"], train=False)
    assert batch["label"].tolist() == [3, 4, 2, IGNORE_INDEX]
    assert batch["valid"].tolist() == [True, True, True, False]
    assert skipped["corrupt"] == 1


def test_jpg_webp_and_grayscale_decode_to_rgb(shard_set):
    import io

    from PIL import Image

    def encode(s, i, sample):
        del sample["png"]
        image = Image.fromarray(np.full((8, 8), 40 * (i + 1), dtype=np.uint8))  # grayscale
        buf = io.BytesIO()
        fmt = ["JPEG", "WEBP", "PNG"][i]
        image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        sample[["jpg", "webp", "png"][i]] = buf.getvalue()
        return sample

    data = shard_set([3], extra=encode)
    (batch,), skipped = run(data["pattern"], train=False, batch_size=3)
    assert skipped["corrupt"] == 0 and batch["valid"].all()
    pixels = (batch["image"] * 255).round()
    for i in range(3):
        assert torch.equal(pixels[i, 0], pixels[i, 1]) and torch.equal(pixels[i, 0], pixels[i, 2])
        assert abs(pixels[i].mean().item() - 40 * (i + 1)) <= 2  # jpeg may drift slightly


def test_spec_from_folder_with_index_split(tmp_path):
    from mosa_scale.data import make_shards

    make_shards(
        "digits", str(tmp_path / "d"), samples_per_shard=100, splits="train=0.9,val=0.1", limit=300, progress=False
    )
    val = resolve_shards(DataSpec(str(tmp_path / "d"), split="val"))
    assert [os.path.basename(u) for u in val.urls] == ["val-000000.tar"]
    assert val.sizes == (30,) and val.classes == tuple(str(i) for i in range(10))
    train = resolve_shards(str(tmp_path / "d"))  # default split: train
    assert train.sizes == (100, 100, 70)
    assert count_shard_samples(train.urls[2]) == 70
    with pytest.raises(ValueError, match="split 'test' not in"):
        resolve_shards(DataSpec(str(tmp_path / "d"), split="test"))
    assert shard_name("pipe:aws s3 cp s3://b/x/train-000003.tar -") == "train-000003.tar"


def consume(ld, n):
    out = []
    for batch in ld:
        out.append(batch)
        if len(out) == n:
            break
    return out, ld.state_dict()


def same_batches(a, b) -> bool:
    return all(
        x["key"] == y["key"]
        and torch.equal(x["image"], y["image"])
        and torch.equal(x["label"], y["label"])
        and torch.equal(x["valid"], y["valid"])
        and x["skipped"] == y["skipped"]
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_at_step_s_equals_the_uninterrupted_run(shard_set, truncate, resampled):
    spoiled, _ = corrupt_set(shard_set, truncate)  # resume must keep counts exact too
    spec = DataSpec(spoiled["pattern"], shuffle_buffer=4, samples_per_epoch=40, crop_scale=(0.2, 1.0))
    common = dict(world_size=2, num_workers=2, batch_size=3, image_size=6, epoch=2, seed=7, resampled=resampled)
    for rank in (0, 1):
        full = list(loader(spec, rank=rank, **common))
        n = len(full)
        assert n == (7 if resampled else loader(spec, rank=rank, **common).num_batches)
        for s in sorted({1, 2, 3, n - 1, n}):
            _, state = consume(loader(spec, rank=rank, **common), s)
            assert state["batch"] == s and state["epoch"] == 2
            resumed_loader = loader(spec, rank=rank, resume=state, **common)
            resumed = list(resumed_loader)
            assert len(resumed_loader) == n - s
            assert [b["key"] for b in resumed] == [b["key"] for b in full[s:]]
            assert same_batches(resumed, full[s:])
            assert resumed_loader.state_dict()["batch"] == n
            by_start = list(loader(spec, rank=rank, start_batch=s, **common))
            assert same_batches(by_start, full[s:])


def test_resume_refuses_a_changed_layout_and_next_epoch_moves_on(shard_set):
    data = shard_set(UNEVEN)
    common = dict(world_size=2, num_workers=2)
    _, state = consume(loader(data["pattern"], **common), 2)
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 1.*num_workers: saved 2"):
        loader(data["pattern"], resume=state)
    with pytest.raises(ValueError, match="epoch 0, the loader is for epoch 1"):
        loader(data["pattern"], resume=state, epoch=1, **common)
    with pytest.raises(ValueError, match="either start_batch or resume"):
        loader(data["pattern"], resume=state, start_batch=1, **common)
    assert next_epoch(state) == (0, state)
    assert next_epoch({**state, "batch": state["num_batches"]}) == (1, None)
    assert next_epoch(None) == (0, None)


def test_loader_is_single_pass(shard_set):
    data = shard_set([2])
    ld = loader(data["pattern"])
    list(ld)
    with pytest.raises(RuntimeError, match="single pass"):
        list(ld)


def test_resampled_ranks_get_equal_counts_and_seed_matters(shard_set):
    data = shard_set([5, 2, 7])
    spec = DataSpec(data["pattern"], samples_per_epoch=30)
    common = dict(world_size=2, num_workers=2, batch_size=4, resampled=True)
    r0 = list(loader(spec, rank=0, **common))
    r1 = list(loader(spec, rank=1, **common))
    assert len(r0) == len(r1) == 4  # ceil(30 / (2 x 4))
    assert all(b["valid"].all() for b in r0 + r1)
    other = list(loader(spec, rank=0, seed=1, **common))
    assert [b["key"] for b in other] != [b["key"] for b in r0]
    assert set(valid_keys(r0 + r1)) <= set(data["samples"])


def test_round_robin_and_resume_point_match_the_dataloader_order():
    assert round_robin([2, 1, 3]) == [0, 1, 2, 0, 2, 2]
    assert round_robin([2, 1, 3], start=2) == [2, 0, 1, 2, 0, 2]
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.randrange(0, 5) for _ in range(rng.randrange(1, 5))]
        full = round_robin(counts)
        for s in range(len(full) + 1):
            skip, first = resume_point(counts, s)
            remaining = [c - k for c, k in zip(counts, skip)]
            assert round_robin(remaining, start=first) == full[s:]


def test_plan_covers_every_shard_once_with_equal_batches():
    sizes = [9, 3, 14, 5, 1, 8, 6, 2, 11]
    plans = [
        plan_epoch(
            sizes,
            num_shards=9,
            rank=r,
            world_size=3,
            num_workers=2,
            batch_size=4,
            seed=3,
            epoch=1,
            shuffle=True,
            resampled=False,
            samples_per_epoch=None,
        )
        for r in range(3)
    ]
    shards = sorted(i for p in plans for w in p.worker_shards for i in w)
    assert shards == list(range(9))
    assert len({p.num_batches for p in plans}) == 1
    for p in plans:
        assert sum(p.worker_batches) == p.num_batches
        for shards_w, batches_w in zip(p.worker_shards, p.worker_batches):
            assert batches_w * 4 >= sum(sizes[i] for i in shards_w)


def test_resampled_without_index_needs_no_counting(shard_set):
    data = shard_set([5, 2, 7], index=False)
    spec = DataSpec(data["pattern"], samples_per_epoch=20)
    assert resolve_shards(spec, count=False).sizes is None  # no shard is read to plan
    batches = list(loader(spec, num_workers=2, resampled=True))
    assert len(batches) == 5 and all(b["valid"].all() for b in batches)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        loader(DataSpec(data["pattern"]), resampled=True, shards=resolve_shards(spec, count=False))


def test_shuffle_buffer_mixes_the_samples_of_a_shard(shard_set):
    data = shard_set([12])
    plain = valid_keys(run(DataSpec(data["pattern"], shuffle_buffer=0))[0])
    mixed = valid_keys(run(DataSpec(data["pattern"], shuffle_buffer=8))[0])
    assert plain == sorted(data["samples"])
    assert mixed != plain and sorted(mixed) == plain
    assert valid_keys(run(DataSpec(data["pattern"], shuffle_buffer=8))[0]) == mixed
