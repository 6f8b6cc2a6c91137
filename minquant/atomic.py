"""Write a folder so that it is never half-written: the old one or the new one, whole.

A checkpoint is several files (weights, config.json, the tokenizer's). Writing them one by one
into the destination means a crash, a kill or a full disk part-way leaves a folder that holds
some new files and some old ones: it loads as neither. So `new_folder` writes everything into a
hidden sibling folder first (same filesystem, so the last step is a rename, not a copy), flushes
every file to disk (fsync: after a power cut the rename must not survive while the data does
not), and only then swaps it in:

    out/                      <- the old checkpoint, untouched while we write
    .out.minquant-tmp-k3j9/   <- the new one, written and fsynced here
    rename(2) exchange        -> out/ is the new one, .out.minquant-tmp-k3j9/ the old one, deleted

Linux swaps two folders in one step (renameat2 with RENAME_EXCHANGE). Elsewhere, and on file
systems that refuse it, the old folder is moved aside to `.out.minquant-old-*` first; if we die
between the two renames, the next save (or load) finds it there and puts it back. A write that
fails removes its temporary folder; one killed outright leaves it for the next save to remove.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

TMP, OLD = ".minquant-tmp-", ".minquant-old-"


def is_minquant_checkpoint(folder: Path) -> bool:
    """Does `folder` hold a checkpoint minquant wrote (config.json says `quantized_by: minquant`)?"""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quantized_by") == "minquant"


def check_destination(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A clear error, before any work, when `out` cannot take a new checkpoint.

    Allowed: a new or empty folder, or one holding a minquant checkpoint (replaced whole, never
    merged). Any other non-empty folder is refused unless `overwrite` (then it is replaced whole, too).
    """
    if str(out).strip() == "":
        raise ValueError("the output folder is empty (''); name a folder to write the checkpoint to")
    out = Path(out)
    recover(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: cannot write a checkpoint there")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_minquant_checkpoint(out):
        raise ValueError(f"{out} is not empty and holds no minquant checkpoint; saving replaces the whole folder, "
                         "so pass overwrite=True (--overwrite) if that is what you want, or choose another folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write into {parent}: the checkpoint is written beside {out.name} first")
    return out


def recover(out: Path, clean: bool = True) -> None:
    """Undo what an interrupted save left: the old folder put back if `out` is gone (a kill between
    the two renames of a swap); with `clean`, the temporaries of killed saves removed."""
    out, parent = Path(out), Path(out).absolute().parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{out.name}{OLD}*"), key=lambda p: p.stat().st_mtime)
    if not out.exists() and olds and any(olds[-1].iterdir()):
        os.rename(olds.pop(), out)
    if clean:
        for leftover in olds + sorted(parent.glob(f".{out.name}{TMP}*")):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def new_folder(out: str | os.PathLike, overwrite: bool = False):
    """`with new_folder(out) as tmp:` write files into tmp; on success `out` becomes that folder, whole.

    On any exception (or KeyboardInterrupt) `out` is left exactly as it was and tmp is removed.
    """
    out = check_destination(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP}", dir=out.absolute().parent))
    try:
        yield tmp
        _finish(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(folder: Path) -> None:
    """Every file flushed to disk with the same mode (rw for whom the umask allows; mkdtemp made 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            _fsync(path)
    folder.chmod(0o777 & ~umask)
    _fsync(folder)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # Windows cannot open a folder; its files were synced, which is what matters
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory; the data files were synced
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(fd)


def _swap(tmp: Path, out: Path) -> None:
    """Make `tmp` the folder `out`: one atomic exchange where the OS can, else two renames."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # onto nothing, or onto an empty folder: one rename
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # after the exchange, tmp holds the old checkpoint
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD}", dir=out.absolute().parent))
        os.replace(out, old)  # a crash from here to the next line: `recover` puts `old` back
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(out.absolute().parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux's C library (macOS, Windows)
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # file system or kernel without it
        return False
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")
