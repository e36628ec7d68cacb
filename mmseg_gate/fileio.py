"""Files: written so that a kill or a crash never leaves a half-written one behind and two
processes never write the same folder unknowingly; safetensors read with errors that name the
file."""
import fcntl
import glob
import os
import os.path as osp
import uuid
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

TMP_SUFFIX = '.gate-tmp'


class FolderLocked(RuntimeError):
    """Another live process holds the lock of a folder this one wants to write."""


def temporary_name(path: str) -> str:
    """Where ``path`` is written before it is renamed into place (same folder): a name of this
    process's own, so that two writers never share a temporary."""
    return f'{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}'


def commit(tmp_path: str, path: str) -> None:
    """Flush ``tmp_path`` to disk and rename it to ``path`` in one step, readable as any new
    file (some writers, e.g. safetensors, create owner-only files)."""
    with open(tmp_path, 'rb+') as f:
        os.fsync(f.fileno())
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temporary path to write; on success it becomes ``path``, on error it is
    removed."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(folder: str) -> None:
    """Delete what a process killed while writing left in ``folder``."""
    for stale in glob.glob(osp.join(glob.escape(folder), f'*{TMP_SUFFIX}')):
        os.remove(stale)


@contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) while the block runs;
    :class:`FolderLocked` at once, naming the holder's process id, if another process holds
    it. The kernel releases the lock when its holder exits or is killed, so a killed run never
    leaves a stale lock behind (the file stays, unlocked)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
            raise FolderLocked(f"'{path}' is locked by process {holder}") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def safetensors_metadata(path: str) -> Dict[str, str]:
    """The string metadata of a safetensors file's header (empty when it has none)."""
    with safe_open(path, 'pt') as f:
        return dict(f.metadata() or {})


def read_safetensors(path: str, what: str, fix: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` (``what`` it should be, e.g. "ADM
    checkpoint"), finite; otherwise an error naming the file, the problem and ``fix``."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist. {fix}")
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001  (SafetensorError names no file)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ''
        raise ValueError(f"{what} '{path}' is not a readable safetensors file "
                         f'({type(err).__name__}: {message}): it is truncated, empty or '
                         f'another format (a pickle renamed .safetensors?). {fix}') from err
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f"{what} '{path}' holds non-finite (NaN or infinite) values in "
                         f'{len(bad)} tensor(s), e.g. {bad[:3]}: the file is corrupt. {fix}')
    return tensors
