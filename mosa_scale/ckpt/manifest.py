"""The manifest of a checkpoint tag: every file's size and sha256, written once all ranks finished.

``checkpoints/<tag>/manifest.json`` is written (atomically, synced to disk) after every rank has
written and closed its files and before ``latest`` moves to the tag, so a tag with a manifest is
complete and a tag without one is an interrupted save. Readers (resume, ``merge_adapter.py``,
``inspect_checkpoint.py``) verify it first: a missing, truncated, altered or unlisted file refuses
the checkpoint, naming the file, before anything is unpickled. Nothing here depends on DeepSpeed's
file names: the manifest lists whatever files the tag holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mosa_scale.ckpt.safe_load import CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT = "mosa_scale.checkpoint/1"
_CHUNK = 1 << 22


def tag_files(tag_dir: str | Path) -> list[str]:
    """The files of a tag (relative POSIX paths, sorted), the manifest itself excluded."""
    d = Path(tag_dir)
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def file_digest(path: str | Path, *, sync: bool = False) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of one file; ``sync`` also flushes it to disk first."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def digest_files(tag_dir: str | Path, names: Iterable[str], *, sync: bool = False) -> dict[str, dict[str, Any]]:
    """:func:`file_digest` of each named file of ``tag_dir``."""
    d = Path(tag_dir)
    return {n: file_digest(d / n, sync=sync) for n in names}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(
    tag_dir: str | Path,
    files: Mapping[str, Mapping[str, Any]],
    *,
    step: int,
    world_size: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``tag_dir/manifest.json`` atomically (temp file, fsync, rename, fsync of the folder).

    Args:
        tag_dir: The checkpoint tag folder.
        files: :func:`digest_files` of every file of the tag.
        step: The optimizer step the tag holds (retention orders tags by it).
        world_size: Ranks that wrote the tag.
        extra: More fields to record.
    """
    d = Path(tag_dir)
    body = {
        "format": FORMAT,
        "tag": d.name,
        "step": int(step),
        "world_size": int(world_size),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra or {}),
        "files": {k: dict(files[k]) for k in sorted(files)},
    }
    tmp = d / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST_NAME)
    _fsync_dir(d)
    return d / MANIFEST_NAME


def read_manifest(tag_dir: str | Path) -> dict[str, Any]:
    """The manifest of a tag.

    Raises:
        CheckpointError: when it is missing (an interrupted save, or a checkpoint written before
            manifests existed) or not a manifest.
    """
    path = Path(tag_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: checkpoint {Path(tag_dir).name!r} is incomplete (its save was "
            "interrupted) or was not written by this version of mosa_scale; use another tag"
        )
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); the manifest is damaged") from e
    files = body.get("files") if isinstance(body, dict) else None
    if (
        body.get("format") != FORMAT
        or not isinstance(files, dict)
        or not isinstance(body.get("step"), int)
        or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    ):
        raise CheckpointError(
            f"{path}: not a {FORMAT} manifest (format, step, files with bytes and sha256); the manifest is damaged"
        )
    return body


def manifest_step(tag_dir: str | Path) -> int | None:
    """The step a complete tag holds; None for a folder without a valid manifest."""
    try:
        return int(read_manifest(tag_dir)["step"])
    except CheckpointError:
        return None


def unlisted_files(tag_dir: str | Path, manifest: Mapping[str, Any]) -> list[str]:
    """One line per file of the tag that its manifest does not list (DeepSpeed would read some)."""
    d = Path(tag_dir)
    return [
        f"{d / n}: not listed in {MANIFEST_NAME} (added after the checkpoint was written); remove it"
        for n in tag_files(d)
        if n not in manifest["files"]
    ]


def file_problems(tag_dir: str | Path, manifest: Mapping[str, Any], names: Sequence[str] | None = None) -> list[str]:
    """What is wrong with the tag's files against its manifest, one line per file.

    Args:
        tag_dir: The tag folder.
        manifest: Its :func:`read_manifest`.
        names: Check only these files (a rank's share); None checks every listed file and also
            reports files the manifest does not list.
    """
    d = Path(tag_dir)
    listed: Mapping[str, Mapping[str, Any]] = manifest["files"]
    out = []
    if names is None:
        out += unlisted_files(d, manifest)
        names = sorted(listed)
    for n in names:
        want, path = listed[n], d / n
        if not path.is_file():
            out.append(f"{path}: missing (the manifest lists it, {want['bytes']} bytes)")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            out.append(f"{path}: {size} bytes, the manifest records {want['bytes']}: the file is truncated or damaged")
            continue
        if file_digest(path)["sha256"] != want["sha256"]:
            out.append(f"{path}: sha256 differs from the manifest's: the file is damaged or altered")
    return out


def verify_tag(tag_dir: str | Path) -> dict[str, Any]:
    """Checks every file of a tag against its manifest (sizes, then sha256); returns the manifest.

    Raises:
        CheckpointError: listing every missing, truncated, altered or unlisted file.
    """
    manifest = read_manifest(tag_dir)
    problems = file_problems(tag_dir, manifest)
    if problems:
        raise CheckpointError(refusal(tag_dir, problems))
    return manifest


def refusal(tag_dir: str | Path, problems: Sequence[str]) -> str:
    """One message for a refused tag, one line per problem."""
    lines = [
        f"checkpoint {tag_dir} is refused ({len(problems)} problem(s)):",
        *(f"  - {p}" for p in problems),
        "copy the files again, or use an earlier tag",
    ]
    return "\n".join(lines)


def verify_member(path: str | Path) -> None:
    """Checks one file against the manifest of the tag folder it is in, when that folder has one.

    Raises:
        CheckpointError: naming the file, when it is not listed, truncated or altered.
    """
    path = Path(path)
    if not (path.parent / MANIFEST_NAME).is_file():
        return
    manifest = read_manifest(path.parent)
    if path.name not in manifest["files"]:
        raise CheckpointError(f"{path}: not listed in {path.parent / MANIFEST_NAME}")
    problems = file_problems(path.parent, manifest, [path.name])
    if problems:
        raise CheckpointError(problems[0])
