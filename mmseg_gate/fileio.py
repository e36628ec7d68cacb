"""Writing files so that a kill or a crash never leaves a half-written one behind."""
import glob
import os
import os.path as osp
from contextlib import contextmanager
from typing import Iterator

TMP_SUFFIX = '.gate-tmp'


def temporary_name(path: str) -> str:
    """Where ``path`` is written before it is renamed into place (same folder)."""
    return path + TMP_SUFFIX


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
