"""The study's results: one JSON row per finished run, appended to ``rows.jsonl`` and flushed to
disk as soon as the run ends, so a killed study loses at most the run in progress."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RowStore:
    """``rows.jsonl`` of a study folder, read at open and appended to.

    A row cut short by a kill (the file does not end in a newline) is dropped and truncated away on
    open, so the next row starts on a line of its own.

    Raises:
        ValueError: a complete line that is not a JSON object with an ``id`` (names the line).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if not path.is_file():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a row cut short by an interrupted write (%d bytes)", path, len(data) - end)
            with path.open("r+b") as f:
                f.truncate(end)
        for i, line in enumerate(data[:end].decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not a JSON row ({e}); remove or fix that line") from e
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{path}, line {i}: a row must be a JSON object with an 'id'")
            self.rows[row["id"]] = row

    def __contains__(self, run_id: str) -> bool:
        return run_id in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, run_id: str) -> dict[str, Any] | None:
        return self.rows.get(run_id)

    def values(self) -> list[dict[str, Any]]:
        return list(self.rows.values())

    def append(self, row: dict[str, Any]) -> None:
        """Writes ``row`` as one line and forces it to disk before returning."""
        line = json.dumps(row, sort_keys=True) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["id"]] = row
