"""Errors about the data itself (not the code reading it)."""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot serve the run: an epoch without any valid sample, more samples lost than
    ``data.max_skip_rate`` allows, or shards that are not the ones an index lists."""


class SourceError(DataError):
    """A source file of ``make_shards`` cannot be read as a labelled image."""
