"""Files written whole or not at all: each is written beside its name and renamed into place.

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
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from typing import Any

PARTIAL = ".tmp"   # the suffix of a file being written
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yields the path beside ``path`` to write; when the block ends, renames it to ``path`` (the one step other
    processes see). On an error the partial file is removed; an ``OSError`` is raised again naming ``path``.

    Blocks nested for several files of one folder rename them one right after another, innermost first, and only
    once every one was written: a failed write leaves all the old files as they were, and its error names the
    file whose write failed.
    """
    path = os.fspath(path)
    partial = f"{path}{PARTIAL}"
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(partial)
        if not isinstance(e, OSError) or isinstance(e, WriteError):   # named already, by a block inside this one
            raise
        fix = (" Free disk space, or write to another folder" if e.errno in _FULL else
               " Write to a folder you may write to" if e.errno in _DENIED else "")
        why = f"cannot write {path}: {e.strerror or e}; the file there before, if any, is unchanged.{fix}"
        raise (WriteError(e.errno, why) if e.errno is not None else WriteError(why)) from e


class WriteError(OSError):
    """A file of :func:`replacing` could not be written (its message names it; the old file is unchanged)."""


def replace_json(path: str | os.PathLike, value: Any, *, ensure_ascii: bool = True) -> None:
    """Writes ``value`` as indented JSON with a final newline as the file ``path``, whole or not at all."""
    with replacing(path) as partial, open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=ensure_ascii)
        f.write("\n")
