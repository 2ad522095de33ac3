"""Avatars: portraits prepared once (the face found, its crop encoded) that any number of sessions open by id.

Two kinds. Configured ones (`ServerConfig.avatars`: the bundled `default`, `--avatar ID=PATH`) are loaded at start
and stay. Uploaded ones (`POST /v1/avatars`) are prepared when they come, and removed by `DELETE /v1/avatars/{id}`;
with `ServerConfig.avatar_dir` (`--avatar-dir`) they are also kept on disk, so a restart prepares them again: the
upload's bytes as sent (`ID.upload`) and a record (`ID.json`: name, key colour, time), each written under a temporary
name and renamed, the record last. A crash mid-write leaves at most a file without a record, which is never loaded
(and is overwritten by the next upload of that id).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from letstalk_rt.errors import InputError
from letstalk_rt.media import parse_colour, remove_abandoned_partials, write_file_atomic

if TYPE_CHECKING:
    from letstalk_rt.pipeline import Portrait

log = logging.getLogger("letstalk.server")

AVATAR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a file name on every system: no dots, no slashes
MAX_NAME = 80
DEFAULT_MAX_AVATARS = 32  # each holds its photo (at most 1280 px a side: up to ~5 MB) and its crop's latent


class AvatarRefused(Exception):
    """An avatar request the store turns down: `status` is the HTTP status (404, 409 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Avatar:
    id: str
    name: str
    portrait: Portrait
    uploaded: bool = False  # POST /v1/avatars (deletable); else configured at start
    created_at: float | None = None  # uploaded ones: unix time

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "uploaded": self.uploaded}
        if self.created_at is not None:
            out["created_at"] = round(self.created_at, 3)
        return out


@dataclass
class StoredAvatar:
    """An uploaded avatar as kept on disk: what `AvatarStore.stored` reads back at start."""

    id: str
    name: str
    data: bytes  # the upload as sent
    background: tuple[int, int, int] | None
    created_at: float


def check_name(value: Any) -> str:
    """An avatar's display name: printable, at most MAX_NAME characters (InputError saying so)."""
    name = " ".join(str(value).split())
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise InputError(f"`name` must be 1..{MAX_NAME} printable characters")
    return name


class AvatarStore:
    """The server's avatars by id, at most `limit` uploaded ones (configured ones do not count), those kept on disk
    under `directory` when it is set. An id is reserved while its upload is prepared, so two uploads naming the same
    id cannot both be accepted."""

    def __init__(self, directory: Path | None = None, limit: int = DEFAULT_MAX_AVATARS) -> None:
        self.directory = directory
        self.limit = limit
        self._avatars: dict[str, Avatar] = {}
        self._pending: set[str] = set()

    def __contains__(self, avatar_id: object) -> bool:
        return avatar_id in self._avatars

    def __getitem__(self, avatar_id: str) -> Avatar:
        return self._avatars[avatar_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._avatars)

    def values(self) -> list[Avatar]:
        return list(self._avatars.values())

    @property
    def uploaded(self) -> int:
        return sum(a.uploaded for a in self._avatars.values())

    def add(self, avatar: Avatar) -> None:
        self._avatars[avatar.id] = avatar

    def reserve(self, avatar_id: str | None) -> str:
        """The id a new upload gets (`avatar_id`, checked, or a fresh random one), held until `release`; refused
        (AvatarRefused) if it is malformed or taken, or the store is full."""
        if self.limit == 0:
            raise AvatarRefused(409, "this server takes no avatar uploads (--max-avatars 0)")
        if self.uploaded + len(self._pending) >= self.limit:
            raise AvatarRefused(409, f"this server already holds {self.limit} uploaded avatars (--max-avatars); "
                                     "delete one (DELETE /v1/avatars/{id}) first")
        if avatar_id is None or avatar_id == "":
            avatar_id = "av-" + secrets.token_hex(5)
        elif not isinstance(avatar_id, str) or not AVATAR_ID.fullmatch(avatar_id):
            raise AvatarRefused(422, f"`id` {str(avatar_id)[:70]!r}: use 1-64 letters, digits, '-' or '_', "
                                     "starting with a letter or digit")
        if avatar_id in self._avatars or avatar_id in self._pending:
            raise AvatarRefused(409, f"avatar {avatar_id!r} already exists; delete it first or choose another id")
        self._pending.add(avatar_id)
        return avatar_id

    def release(self, avatar_id: str) -> None:
        self._pending.discard(avatar_id)

    def get(self, avatar_id: str) -> Avatar:
        avatar = self._avatars.get(avatar_id)
        if avatar is None:
            raise AvatarRefused(404, f"avatar {avatar_id[:70]!r} does not exist (GET /v1/avatars lists them)")
        return avatar

    def remove(self, avatar_id: str) -> Avatar:
        """Forget an uploaded avatar (sessions already open on it go on; `delete_files` then deletes its files);
        AvatarRefused for an unknown or a configured one."""
        avatar = self.get(avatar_id)
        if not avatar.uploaded:
            raise AvatarRefused(409, f"avatar {avatar_id!r} is configured at start (--avatar, or the bundled "
                                     "default); only uploaded avatars can be deleted")
        del self._avatars[avatar_id]
        self._pending.add(avatar_id)  # until its files are gone (`delete_files`): a new upload of it waits for that
        return avatar

    # -- on disk (called off the event loop)

    def save(self, avatar: Avatar, data: bytes, background: tuple[int, int, int] | None) -> None:
        """Keep an uploaded avatar under `directory` (nothing without one): the upload, then its record, each whole or
        not at all (OSError: the folder cannot be made; OutputError: a file cannot be written)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"id": avatar.id, "name": avatar.name, "created_at": avatar.created_at,
                  "background": None if background is None else "%02x%02x%02x" % background}
        fix = "check --avatar-dir"
        write_file_atomic(self.directory / f"{avatar.id}.upload", lambda tmp: tmp.write_bytes(data), fix)
        write_file_atomic(self.directory / f"{avatar.id}.json", lambda tmp: tmp.write_text(json.dumps(record)), fix)

    def delete_files(self, avatar_id: str) -> None:
        """The files of an avatar `remove`d (off the loop); its id is free again after."""
        try:
            if self.directory is not None:
                for suffix in (".json", ".upload"):  # the record first: a file left without one is never loaded
                    (self.directory / f"{avatar_id}{suffix}").unlink(missing_ok=True)
        finally:
            self._pending.discard(avatar_id)

    def stored(self) -> list[StoredAvatar]:
        """The uploaded avatars kept under `directory`, oldest first; a record that cannot be read is skipped with a
        warning (its files are left for a person to look at)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        with contextlib.suppress(OSError):  # an upload being written when a server was killed: never to be finished
            for partial in remove_abandoned_partials(self.directory):
                log.warning("avatars: deleted %s, an unfinished file no process writes any more", partial.name)
        out = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                avatar_id = record["id"]
                if not isinstance(avatar_id, str) or not AVATAR_ID.fullmatch(avatar_id) or path.stem != avatar_id:
                    raise ValueError(f"the record's id {avatar_id!r} does not match its file name")
                background = record.get("background")
                out.append(StoredAvatar(
                    id=avatar_id, name=check_name(record["name"]), created_at=float(record["created_at"]),
                    data=(self.directory / f"{avatar_id}.upload").read_bytes(),
                    background=None if background is None else parse_colour(background, "`background`")))
            except (OSError, ValueError, KeyError, TypeError, InputError) as e:
                log.warning("uploaded avatar %s is not loaded: %s", path, e)
        return sorted(out, key=lambda a: a.created_at)
