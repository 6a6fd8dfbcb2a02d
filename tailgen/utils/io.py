"""Atomic file writes and content hashing."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from tailgen.utils.errors import DataError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temporary file onto ``path``.

    A crash mid-write leaves either the old file or nothing, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (used to key caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def array_digest(*arrays) -> str:
    """SHA-256 hex digest of numpy arrays / tensors (shape, dtype and bytes)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def module_digest(module) -> str:
    """SHA-256 hex digest of a ``torch.nn.Module``'s state (parameter/buffer names, shapes, dtypes and bytes):
    the network's identity for cache keys (bfloat16 tensors are hashed as float32)."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        if torch.is_tensor(t):
            a = t.detach().cpu()
            if a.dtype == torch.bfloat16:
                a = a.float()
            a = a.contiguous().numpy()
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def read_npz(path: str | os.PathLike, hint: str = "write or copy it again") -> dict:
    """Every array of an ``.npz`` file (no pickled objects), or one DataError saying what is wrong with the file:
    not an .npz at all, or truncated / corrupt. The caller checks that the file exists (its own hint)."""
    import zipfile

    import numpy as np

    path = Path(path).expanduser()
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise DataError(f"{path} is not an .npz file (numpy's zip format; it starts with {head!r}): {hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path} is a truncated or corrupt .npz file ({first}): {hint}") from None
