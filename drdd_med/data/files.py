"""Writing outputs so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from drdd_med.errors import OutputExistsError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` atomically.

    The temporary name keeps the suffixes of ``path`` (``.nii.gz``, ``.mha``, ``.dcm``) so writers
    that pick the format from the extension work. On error the temporary file is removed and
    ``path`` is untouched. An existing ``path`` raises ``OutputExistsError`` unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output exists already; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike, overwrite: bool = False, check_replaceable: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir`` that replaces it when the block completes.

    On error the staging folder is removed and ``out_dir`` is untouched. An existing ``out_dir``
    raises ``OutputExistsError`` unless ``overwrite``; ``check_replaceable(out_dir)`` may then
    refuse to replace a folder that holds things the writer did not make.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out_dir.name}: output exists already; pass overwrite to replace it")
        if check_replaceable:
            check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial")
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            if not overwrite:
                raise OutputExistsError(f"{out_dir.name}: output appeared while writing; not replacing it")
            if check_replaceable:
                check_replaceable(out_dir)
            retired = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.replaced")
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
