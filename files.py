"""Files written so that a reader never sees half of one, and content hashes.

One helper per job, used everywhere (artifacts, probes, guards, caches, manifests):

    staged_folder(folder)          build a folder beside its final place, rename it in at the end
    atomic_write(path, data)       write a file (text or bytes) via a temporary sibling + rename
    atomic_write_json(path, obj)   the same for JSON
    sha256_file(path)              streaming content hash of a file
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(folder: Path):
    """Yield an empty temporary folder beside ``folder``; when the block finishes, it replaces
    ``folder`` (an existing one is swapped out first, then deleted). If the block raises, the
    temporary folder is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old is not None:
                os.replace(old, folder)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and one rename (``fsync``: flush
    to disk first, for files that record progress)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = False, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent), fsync=fsync)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def source_sha256(*packages: str) -> str:
    """Hex SHA-256 over the ``*.py`` sources of these singlepass subpackages (names and contents, in
    sorted order): what an exported graph was built by (manifest.json ``source_sha256``), so a cached
    benchmark artifact is rebuilt when the export or probe code changes, not only its inputs."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((root / pkg).glob("*.py")):
            h.update(f"{pkg}/{path.name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()
