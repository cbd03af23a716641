"""The package's one atomic writer: bytes, strict JSON and safetensors files.

Every writer puts the data in a temporary file in the destination's folder, flushes and fsyncs it, and
``os.replace``s it over the destination (atomic on POSIX within one file system), so a reader sees the old
file or the new one, never a partial one. The final file gets the usual mode of a new file,
``0o666 & ~umask`` (``tempfile.mkstemp`` would leave ``0o600``).

JSON is strict (RFC 8259): NaN and +-inf become ``null`` (``allow_nan=False`` is then guaranteed to hold),
tuples become lists, numpy/torch scalars become numbers, paths become strings.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_tensors", "to_strict_json", "file_mode",
           "check_writable"]

PathLike = Union[str, Path]


def file_mode() -> int:
    """0o666 & ~umask: the mode ``open(path, 'w')`` gives a new file (reads the umask without changing it
    for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: PathLike, write) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, fsync, chmod, os.replace."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: {path} is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + os.replace)."""
    if isinstance(data, str):
        raise ValueError("data: give bytes (encode the text first, e.g. text.encode())")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write)


def to_strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, tuples by lists, numpy/torch scalars and
    0-d arrays by Python numbers, paths by strings (so ``json.dumps(..., allow_nan=False)`` succeeds)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars and one-element arrays
    if callable(item) and getattr(obj, "ndim", 1) == 0:
        return to_strict_json(item())
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return to_strict_json(tolist())
    raise ValueError(f"obj: {type(obj).__name__} is not JSON-serialisable; convert it to numbers/strings first")


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 1) -> None:
    """Write ``obj`` as strict JSON (non-finite floats -> null, never a bare NaN) atomically."""
    text = json.dumps(to_strict_json(obj), indent=indent, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_save_tensors(tensors: dict, path: PathLike, metadata: Optional[dict] = None) -> None:
    """Write ``{name: tensor}`` as a safetensors file atomically (tensors moved to CPU, made contiguous).
    ``metadata``: a {str: str} header (safetensors' own restriction)."""
    from safetensors.torch import save_file

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata: safetensors metadata must map str to str")
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def check_writable(folder: PathLike, name: str = "out") -> Path:
    """Create ``folder`` if needed and check that a file can be written there, before any work; a
    ValueError naming the argument ``name`` otherwise. Returns the folder."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}: {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".diffsteer-write-test-")
        os.close(fd)
        os.remove(probe)
    except NotADirectoryError:
        raise ValueError(f"{name}: a part of {folder} is a file, not a folder; give a folder path") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot write into {folder} ({e.strerror or e}); give a writable folder") from None
    return folder
