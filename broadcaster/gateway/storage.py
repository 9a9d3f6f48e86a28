"""Where job outputs live until an app fetches them.

A small interface so an S3-compatible store can replace the local folder
later: `put` returns a key, the gateway serves `/outputs/<key>` from `get`.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Protocol

CONTENT_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp"}
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class OutputNotFound(KeyError):
    pass


class Storage(Protocol):
    def put(self, suffix: str, data: bytes) -> str:
        """Store bytes under a fresh key ending in `suffix` (".png", ".mp4"); return the key."""
        ...

    def get(self, key: str) -> tuple[bytes, str]:
        """The bytes and content type stored under key; OutputNotFound if none."""
        ...


class LocalFolderStorage:
    """Outputs as files in one folder, named by random keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, suffix: str, data: bytes) -> str:
        key = uuid.uuid4().hex + suffix
        tmp = self.root / (key + ".part")
        tmp.write_bytes(data)
        tmp.replace(self.root / key)
        return key

    def get(self, key: str) -> tuple[bytes, str]:
        # Keys are ours: anything else (paths, dot-dot) is simply not found.
        if not _KEY.match(key) or key.endswith(".part"):
            raise OutputNotFound(key)
        path = self.root / key
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise OutputNotFound(key) from None
        return data, CONTENT_TYPES.get(path.suffix, "application/octet-stream")
