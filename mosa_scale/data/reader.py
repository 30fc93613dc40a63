"""Reading raw samples from tar shards, surviving bad shards and counting every lost sample.

A raw sample is a dict of field extension -> bytes plus `__key__` and `__url__`, not decoded:
decoding happens after the shuffle buffer and after resume skipping, so skipped samples cost
only their read.

Tar members come from webdataset's `tar_file_iterator` and are grouped into samples by its
`group_by_keys`. That stage refuses a sample holding the same field twice (webdataset's rule):
here this is a read error of its shard, so the rest of that shard is skipped and counted like a
truncated shard (one bad shard, its unread samples missing). Shard draws in resampled mode are
webdataset's `ResampledShards`, seeded per reader.

What stays our own is the loop around them: `iter_shard` opens, reads and closes one shard
itself, because webdataset's `url_opener` / `tarfile_samples` stages hand errors to a handler
that can only skip or stop, and cannot say how many samples a shard promised and did not
deliver (`missing`, `bad_shards`, `extra` must be counted exactly, and a reader must never
yield more samples than its plan holds, or ranks would disagree on their batch counts).
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.shardlists import ResampledShards
from webdataset.tariterators import group_by_keys, tar_file_iterator

__all__ = ["SkipCounts", "iter_shard", "resampled_samples", "sequential_samples"]

logger = logging.getLogger(__name__)

RawSample = dict[str, object]

# What a bad shard can raise while it is opened, streamed, decompressed or closed.
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


@dataclass
class SkipCounts:
    """Samples and shards lost so far.

    Attributes:
        corrupt: Samples read but unusable (undecodable image, missing or invalid label).
        missing: Samples an index promised that a truncated or unreadable shard did not hold.
        bad_shards: Shards that failed to open, broke off, or ended early.
        extra: Samples beyond the index's count of their shard (stale index), not used.
    """

    corrupt: int = 0
    missing: int = 0
    bad_shards: int = 0
    extra: int = 0

    def pop(self) -> dict[str, int]:
        """Return the counts as a dict and reset them to zero."""
        out = asdict(self)
        self.corrupt = self.missing = self.bad_shards = self.extra = 0
        return out


def iter_shard(url: str, expected: int | None, counts: SkipCounts) -> Iterator[RawSample]:
    """Yield the complete samples of one shard; count what is lost instead of raising.

    On a read error the sample being assembled is dropped and the rest of the shard skipped;
    with `expected` known, `expected - yielded` samples are counted as missing. Samples past
    `expected` are not yielded (counted as `extra`), so a reader never exceeds its plan.

    Args:
        url: Local path or `pipe:` command.
        expected: Samples the index promises for this shard (None: unknown).
        counts: Accumulator updated in place.

    Yields:
        Raw samples with `__key__` and `__url__`.
    """
    yielded = extra = 0
    error: BaseException | None = None
    try:
        stream = gopen(url, "rb")
    except _SHARD_ERRORS as exn:
        stream, error = None, exn
    if stream is not None:
        complete = False
        try:
            members = ({**m, "__url__": url} for m in tar_file_iterator(stream, handler=reraise_exception))
            for sample in group_by_keys(members, handler=reraise_exception):
                if expected is None or yielded < expected:
                    yielded += 1
                    yield sample
                else:
                    extra += 1
            complete = True
        except _SHARD_ERRORS as exn:
            error = exn  # the sample being assembled (or with a duplicate field) is dropped with the rest
        finally:
            try:
                stream.close()  # a pipe reports the exit status of its command here
            except _SHARD_ERRORS as exn:
                if complete:  # after an early stop by the consumer, a broken pipe is expected
                    error = exn
    lost = max(0, expected - yielded) if expected is not None else 0
    if error is not None or lost:
        counts.bad_shards += 1
        counts.missing += lost
        reason = f"read error: {error}" if error is not None else "ended early (truncated?)"
        logger.warning(
            "shard %s: %s; skipped the rest of the shard after %d samples%s",
            url,
            reason,
            yielded,
            f", {lost} of {expected} samples lost" if expected is not None else "",
        )
    if extra:
        counts.extra += extra
        logger.warning(
            "shard %s holds %d samples more than the %s of its index; they are not used (rewrite the index)",
            url,
            extra,
            expected,
        )


def sequential_samples(urls: Sequence[str], sizes: Sequence[int], counts: SkipCounts) -> Iterator[RawSample]:
    """Samples of the given shards in order.

    Args:
        urls: Shard URLs.
        sizes: Expected samples of each shard.
        counts: Accumulator updated in place.

    Yields:
        Raw samples.
    """
    for url, size in zip(urls, sizes):
        yield from iter_shard(url, size, counts)


def resampled_samples(
    urls: Sequence[str], sizes: Sequence[int] | None, seed: int, counts: SkipCounts
) -> Iterator[RawSample]:
    """Endless samples of shards drawn with replacement (webdataset's `ResampledShards`).

    Stops (instead of spinning forever) when 2 x len(urls) draws in a row yield nothing.

    Args:
        urls: Shard URLs.
        sizes: Expected samples of each shard (None: unknown).
        seed: Seed of this reader's shard draws.
        counts: Accumulator updated in place.

    Yields:
        Raw samples.
    """
    expected = dict(zip(urls, sizes)) if sizes is not None else {}
    # A list reaches ResampledShards unchanged (no brace or `::` expansion of `pipe:` commands);
    # `seed` already holds run seed, epoch, rank and worker, and deterministic=True keeps the
    # draws free of the process id and clock.
    draws = ResampledShards(list(urls), seed=0, worker_seed=lambda: seed, deterministic=True)
    empty_draws = 0
    for draw in draws:
        got = 0
        for sample in iter_shard(draw["url"], expected.get(draw["url"]), counts):
            got += 1
            yield sample
        empty_draws = 0 if got else empty_draws + 1
        if empty_draws >= 2 * len(urls):
            break
    logger.error("%d shard draws in a row gave no sample; this reader pads the rest of its epoch", empty_draws)
