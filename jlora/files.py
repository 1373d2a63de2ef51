"""Files written whole or not at all: each is written beside its name and renamed into place; and a lock file
beside a folder, for the one process that writes into it (:func:`locked`).

A full disk, a killed process or a reader that maps the file while it is rewritten never sees a truncated file:
until the rename, readers see the old file (whose pages stay valid even while mapped); after it, the new one.
A failed write removes its partial file and raises an ``OSError`` naming the file it was writing.

Examples:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "note.json"
    >>> replace_json(path, {"step": 1})
    >>> with replacing(path) as partial:
    ...     _ = open(partial, "w").write('{"step": 2}')
    >>> path.read_text()
    '{"step": 2}'
    >>> sorted(p.name for p in path.parent.iterdir())    # no partial file left beside it
    ['note.json']
    >>> with replacing(path.parent / "missing" / "x.json") as partial:
    ...     _ = open(partial, "w")
    Traceback (most recent call last):
    ...
    FileNotFoundError: [Errno 2] cannot write .../missing/x.json: No such file or directory; the file there before, if any, is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yields a new path beside ``path`` (a hidden name of its own, ``.<name>.<random>.tmp``) to write; when the
    block ends, renames it to ``path`` (the one step other processes see). On an error the partial file is removed
    and the ``OSError`` is raised again, of the same kind, naming ``path``.

    Blocks nested for several files of one folder rename them one right after another, innermost first, and only
    once every one was written: a failed write leaves all the old files as they were, and its error names the
    file whose write failed. Two writers of one file each write their own partial file; the last rename wins.
    (Not flushed to the disk: a power cut may still lose the new file, not the old one's name.)
    """
    path = os.fspath(path)
    head, name = os.path.split(path)
    partial = os.path.join(head, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(partial)
        if not isinstance(e, OSError) or getattr(e, "jlora_file", None):   # named already, by a block inside
            raise
        fix = (" Free disk space, or write to another folder" if e.errno in _FULL else
               " Write to a folder you may write to" if e.errno in _DENIED else "")
        why = f"cannot write {path}: {e.strerror or e}; the file there before, if any, is unchanged.{fix}"
        error = OSError(e.errno, why) if e.errno is not None else OSError(why)   # OSError(errno, ...): its subclass
        error.jlora_file = path
        raise error from e


def replace_json(path: str | os.PathLike, value: Any, *, ensure_ascii: bool = True) -> None:
    """Writes ``value`` as indented JSON with a final newline as the file ``path``, whole or not at all."""
    with replacing(path) as partial, open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=ensure_ascii)
        f.write("\n")


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Holds ``.<name>.lock`` beside ``path`` locked (``flock``) for the ``with`` block; raises ``busy(lock file)``
    when another process holds it. The file is removed again at the end, and so are the folders made for it (a
    refused command leaves nothing behind). It is removed while still locked, so a process that opened it meanwhile
    locks a file no longer at the path: each locker checks that the file it locked is the one at the path, and else
    starts again. Where there is no flock (Windows; Lustre without ``-o flock``), the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = pathlib.Path(path)
    lock = path.with_name(f".{path.name}.lock")
    made = [p for p in reversed(path.parents) if not p.exists()]    # outermost first
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(lock, "a")   # open for writing: NFSv4 refuses an exclusive lock on a file opened to read
        except FileNotFoundError:      # its folder was just removed by another locker that made it: again
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise busy(str(lock)) from None
        except OSError as e:
            f.close()
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            f = None                   # a file system without flock: unlocked
            break
        try:
            here = os.stat(lock)
        except FileNotFoundError:
            here = None
        mine = os.fstat(f.fileno())
        if here is not None and (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            break
        f.close()                      # the holder before us removed it: lock the file now at the path
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()              # still locked: see above
        if f is not None:
            f.close()
        for folder in reversed(made):  # innermost first; one that holds anything now stays
            try:
                folder.rmdir()
            except OSError:
                break
