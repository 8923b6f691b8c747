"""The original bytes of each document, one file per document under the blob folder."""

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

HEAD_BYTES = 64 * 1024


class TooLarge(Exception):
    """The upload went past the size limit."""


class BlobWriter:
    """Streams one upload to a temporary file, hashing it and keeping its first bytes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._file = path.open("wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        """Blocking (file and hash work); callers run it in a thread."""
        if self.size + len(data) > self._max_bytes:
            raise TooLarge
        self._file.write(data)
        self._hash.update(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.size += len(data)

    def finish(self) -> str:
        """Flushes to disk and returns the hex SHA-256."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"

    def open(self) -> None:
        """Creates the folders and drops temporary files of uploads a crash cut short."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def writer(self, max_bytes: int) -> BlobWriter:
        return BlobWriter(self._tmp / f"{uuid.uuid4().hex}.part", max_bytes)

    def path(self, document_id: str) -> Path:
        return self.root / document_id[:2] / document_id

    def keep(self, writer: BlobWriter, document_id: str) -> Path:
        """Moves a finished upload to its document's place."""
        target = self.path(document_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(writer.path, target)
        return target

    def delete(self, document_id: str) -> None:
        self.path(document_id).unlink(missing_ok=True)

    def pending_uploads(self) -> list[Path]:
        return sorted(self._tmp.iterdir()) if self._tmp.exists() else []
