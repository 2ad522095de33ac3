"""Saved session recordings under --recordings-dir: DIR/SESSION_ID.mp4, and DIR/SESSION_ID.vtt beside it when the
session showed captions. Listing, deleting, and the retention limits (--recordings-keep-hours, --recordings-max-gb).

A recording being made is a hidden partial file (`stream/recorder.py`), never listed, served or pruned here; its
captions are written before its MP4 moves into place, so a recording listed has its captions in place. A partial file
that no process writes any more (its server was killed while recording) is deleted with the retention pass
(`media.remove_abandoned_partials`), whatever the limits. Files are
touched from threads only (`asyncio.to_thread`): a folder of many recordings is not scanned on the event loop.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from letstalk_rt.media import remove_abandoned_partials
from letstalk_rt.stream.recorder import captions_path

log = logging.getLogger(__name__)

RECORDING_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a recording is named by its session's id


@dataclass(frozen=True)
class SavedRecording:
    id: str
    path: Path  # the MP4
    bytes: int  # the MP4's size
    saved_at: float  # unix time
    captions: bool  # its WebVTT captions are saved beside it (recorder.captions_path)

    def describe(self) -> dict:
        return {"id": self.id, "bytes": self.bytes, "saved_at": round(self.saved_at, 3), "captions": self.captions}


def saved(directory: Path | None) -> list[SavedRecording]:
    """The recordings saved in `directory`, oldest first."""
    if directory is None or not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.mp4"):
        if not RECORDING_ID.fullmatch(path.stem):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # deleted while we looked
            continue
        found.append(SavedRecording(path.stem, path, st.st_size, st.st_mtime, captions_path(path).is_file()))
    return sorted(found, key=lambda r: (r.saved_at, r.id))


def delete(path: Path) -> None:
    """Delete a recording: its MP4 first (what lists and serves it), then its captions."""
    path.unlink(missing_ok=True)
    captions_path(path).unlink(missing_ok=True)


def prune(directory: Path | None, keep_s: float = 0.0, max_bytes: int = 0,
          now: float | None = None) -> tuple[list[SavedRecording], int]:
    """Apply the retention limits: delete the recordings saved more than `keep_s` ago, then, oldest first, as many
    more as it takes for the MP4s left to fit in `max_bytes`, the newest always kept (it may just have been saved,
    and not yet fetched). 0: no such limit. Returns (what was deleted, the bytes of the MP4s left)."""
    now = time.time() if now is None else now
    found = saved(directory)
    old = [r for r in found if keep_s > 0 and now - r.saved_at > keep_s]
    kept = [r for r in found if r not in old]
    total = sum(r.bytes for r in kept)
    too_many = []
    if max_bytes > 0:
        for r in kept[:-1]:
            if total <= max_bytes:
                break
            too_many.append(r)
            total -= r.bytes
    deleted = []
    for r in old + too_many:
        try:
            delete(r.path)
            deleted.append(r)
        except OSError as e:  # one file that cannot go does not stop the rest; said, and tried again next time
            log.warning("recording %s: could not delete it (%s)", r.id, e)
            total += r.bytes if r in too_many else 0
    if deleted:
        log.info("recordings: %d deleted by the retention limits (%s)", len(deleted), ", ".join(r.id for r in deleted))
    abandoned = remove_abandoned_partials(directory) if directory is not None and directory.is_dir() else []
    if abandoned:
        log.warning("recordings: deleted %d unfinished files no process writes any more (a server killed while "
                    "recording): %s", len(abandoned), ", ".join(p.name for p in abandoned))
    return deleted, total
