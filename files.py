"""Writing artifact folders so that a half-written one is never left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(folder: Path):
    """Yield an empty temporary folder beside ``folder``; when the block finishes, it replaces
    ``folder`` in one rename. If the block raises, the temporary folder is removed and
    ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
