"""Record sources: random access to the records of JSONL, Parquet, Arrow and ArrayRecord files, read lazily.

A source is a sequence of raw records: ``len(source)`` and ``source[i] -> (where, raw)``, where ``where`` names the
file and line or row (``data/train.jsonl:17``, ``shard-00001.parquet:row 4``) and ``raw`` is the record as stored
(a JSONL line's bytes, a Parquet/Arrow row as a dict, an ArrayRecord's bytes). :func:`jlora.data.records.parse`
turns a raw record into a dict; nothing here parses or validates records, so a malformed one fails (or is skipped)
where it is used, with its ``where``.

Nothing is loaded whole:

* JSONL: one pass at opening counts the non-blank lines and keeps the byte offset and line number of every
  ``BLOCK``-th one (16 bytes per 64 records); ``source[i]`` seeks to its block and reads forward. Memory stays a few
  hundred KiB for a million records.
* Parquet: decoded once at opening (the asked-for columns, batch by batch) into an Arrow file in :func:`cache_dir`,
  then read like Arrow: Parquet itself cannot read one record without decoding its whole row group.
* Arrow: IPC files or streams (what ``datasets.Dataset.save_to_disk`` writes: ``data-00000-of-00004.arrow``),
  memory-mapped; rows are sliced out without copying the file.
* ArrayRecord: one record per entry, a JSON object's UTF-8 bytes, read with ``array_record``'s random access.

:func:`open_source` takes a file, a folder of shards (a ``save_to_disk`` folder is read in its ``state.json``
order; other folders' files of one format in name order) or a glob, and concatenates the files. Opened sources
are picklable (file handles reopen in each worker process). :func:`fingerprint` identifies the data (sizes,
record counts and sampled bytes of every file), so a run can refuse to resume on changed data.

Examples:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "a.jsonl"), "w") as f:
    ...     _ = f.write('{"prompt": "1+1=", "completion": "2"}\\n\\n{"prompt": "2+2=", "completion": "4"}\\n')
    >>> src = open_source(os.path.join(folder, "a.jsonl"))
    >>> len(src), src[1][0].endswith("a.jsonl:3"), src[1][1]
    (2, True, b'{"prompt": "2+2=", "completion": "4"}')
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BLOCK = 64                    # JSONL: one kept offset per this many records
_CHUNK = 1 << 20              # JSONL: bytes read per step of the indexing pass (what it holds at once)
_SAMPLE_BYTES = 1 << 16       # fingerprint: bytes hashed per sampled block
_SAMPLES = 8                  # fingerprint: blocks sampled per file (plus its first and last)
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow",
             ".ipc": "arrow", ".array_record": "array_record", ".arrayrecord": "array_record"}
_WHITESPACE = b" \t\r\n\f\v"


class DataError(ValueError):
    """A problem with data files or records; the message names the file and, where one is at fault, the record."""


def format_of(path: str) -> str:
    """The format a file's name says (``.jsonl``, ``.parquet``, ``.arrow``, ``.array_record``).

    Examples:
        >>> format_of("data/train-00000-of-00002.parquet"), format_of("x/data-00000-of-00001.arrow")
        ('parquet', 'arrow')
    """
    base = os.path.basename(path)
    for suffix, fmt in _SUFFIXES.items():
        if base.endswith(suffix) or f"{suffix}-" in base:   # array_record shards: name.array_record-00000-of-00004
            return fmt
    raise DataError(f"{path!r}: cannot tell the data format from the file name; name files *.jsonl, *.parquet, "
                    f"*.arrow or *.array_record")


def _file_hash(path: str, n_records: int) -> str:
    """Size, record count and the bytes of the first, last and ``_SAMPLES`` evenly spaced blocks of a file."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}|{n_records}".encode())
    with open(path, "rb") as f:
        starts = {0, max(0, size - _SAMPLE_BYTES)} | {size * k // (_SAMPLES + 1) for k in range(1, _SAMPLES + 1)}
        for start in sorted(starts):
            f.seek(start)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


class _File:
    """One file of records; subclasses implement ``_open``, ``_count`` and ``_get``."""

    format = ""

    def __init__(self, path: str, columns: Sequence[str] = ()):
        self.path = path
        self.columns = tuple(columns)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} not found (cwd {os.getcwd()!r})")
        self._handle = None
        self.length = self._count()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None       # reopened lazily in each process
        state.pop("_cursor", None)
        state.pop("_decoders", None)  # closures, rebuilt from the schema
        return state

    def scan(self):
        """``(where, raw)`` of every record, in order."""
        for i in range(len(self)):
            yield self.get(i)

    def handle(self):
        if self._handle is None:
            self._handle = self._open()
        return self._handle

    def __len__(self) -> int:
        return self.length

    def where(self, i: int) -> str:
        return f"{self.path}:row {i}"

    def fingerprint(self) -> str:
        return _file_hash(self.path, self.length)


class JsonlFile(_File):
    """A JSONL file: non-blank lines are records (``raw``: the line's bytes); ``where`` is ``path:line``."""

    format = "jsonl"

    def _open(self):
        return open(self.path, "rb")

    def _count(self) -> int:
        offsets, lines = [], []   # of records 0, BLOCK, 2*BLOCK, ...: byte offset and 1-based line number
        n = line = pos = 0
        with open(self.path, "rb") as f:
            carry = b""
            while True:
                chunk = f.read(_CHUNK)
                if not chunk and not carry:
                    break
                buf = carry + chunk
                base = pos - len(carry)
                cut = buf.rfind(b"\n") + 1 if chunk else len(buf)   # complete lines only, until the end
                body, carry = buf[:cut], buf[cut:]
                pos += len(chunk)
                if not body:
                    continue
                arr = np.frombuffer(body, np.uint8)
                ends = np.flatnonzero(arr == 10)
                if not len(ends) or ends[-1] != len(body) - 1:
                    ends = np.append(ends, len(body))
                starts = np.concatenate([[0], ends[:-1] + 1])
                first = arr[starts]                               # every start lies inside the body
                record = ~np.isin(first, np.frombuffer(_WHITESPACE, np.uint8))
                for k in np.flatnonzero(~record):          # a line opening with whitespace: blank unless text follows
                    record[k] = bool(body[starts[k]:ends[k]].strip())
                numbers = line + 1 + np.arange(len(starts))
                kept = np.flatnonzero(record)
                take = kept[(n + np.arange(len(kept))) % BLOCK == 0]
                offsets.extend((base + starts[take]).tolist())
                lines.extend(numbers[take].tolist())
                n += len(kept)
                line += len(starts)
                if not chunk:
                    break
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)
        return n

    def _seek(self, i: int) -> tuple[int, bytes]:
        """(line number, bytes) of record ``i``: from the nearest kept offset, or on from the last record read (so
        reading in order is one pass)."""
        f = self.handle()
        cursor = getattr(self, "_cursor", None)
        if cursor is not None and cursor[0] <= i < (cursor[0] // BLOCK + 1) * BLOCK:
            at, line, offset = cursor
        else:
            block = i // BLOCK
            at, line, offset = block * BLOCK, int(self._lines[block]), int(self._offsets[block])
        f.seek(offset)
        while True:
            text = f.readline()
            if not text:
                raise DataError(f"{self.path}: the file changed while being read (record {i} is gone)")
            if text.strip():
                if at == i:
                    self._cursor = (i + 1, line + 1, f.tell())
                    return line, text.rstrip(b"\r\n")
                at += 1
            line += 1

    def scan(self):
        """``(where, raw)`` of every record, in order, in one pass."""
        with open(self.path, "rb") as f:
            for line, text in enumerate(f, 1):
                if text.strip():
                    yield f"{self.path}:{line}", text.rstrip(b"\r\n")

    def where(self, i: int) -> str:
        return f"{self.path}:{self._seek(i)[0]}"

    def get(self, i: int) -> tuple[str, Any]:
        line, text = self._seek(i)
        return f"{self.path}:{line}", text


def cache_dir() -> str:
    """Where decoded copies of Parquet files go: ``$JLORA_DATA_CACHE``, else ``~/.cache/jlora/data``."""
    return os.environ.get("JLORA_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jlora", "data")


def _mapped_table(path: str):
    """A memory-mapped Arrow IPC file or stream as a table (nothing is copied into memory)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def _json_decoder(arrow_type) -> Callable[[Any], Any] | None:
    """How to decode a value of ``arrow_type`` that holds JSON text (the ``arrow.json`` extension type, as
    ``datasets`` stores a ``Json`` feature: a column whose values mix types, e.g. a completion given as a list in
    some records), recursing into lists and structs; None when it holds none.

    Examples:
        >>> import pyarrow as pa
        >>> _json_decoder(pa.list_(pa.json_()))(['{"role": "user"}', '"hi"'])
        [{'role': 'user'}, 'hi']
        >>> _json_decoder(pa.string()) is None
        True
    """
    import pyarrow as pa

    if getattr(arrow_type, "extension_name", None) == "arrow.json":
        return lambda v: v if v is None else json.loads(v)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        item = _json_decoder(arrow_type.value_type)
        return None if item is None else (lambda v: v if v is None else [item(x) for x in v])
    if pa.types.is_struct(arrow_type):
        fields = {f.name: d for f in arrow_type if (d := _json_decoder(f.type)) is not None}
        return None if not fields else (
            lambda v: v if v is None else {k: fields[k](x) if k in fields else x for k, x in v.items()})
    return None


class _TableFile(_File):
    """A file read as an Arrow table (``handle()``), a row per record; JSON-text columns (``datasets``' ``Json``
    feature) are decoded, as ``datasets`` reads them."""

    def get(self, i: int) -> tuple[str, Any]:
        table = self.handle()
        if getattr(self, "_decoders", None) is None:
            self._decoders = {f.name: d for f in table.schema if (d := _json_decoder(f.type)) is not None}
        row = table.slice(i, 1).to_pylist()[0]
        return self.where(i), {k: self._decoders[k](v) if k in self._decoders else v for k, v in row.items()}


class ParquetFile(_TableFile):
    """A Parquet file: rows are records (dicts of the asked-for columns); ``where`` is ``path:row i``.

    Parquet decodes whole pages, so reading single records in a shuffled order costs a row-group decode each (20
    records/s with 10,000-row groups). On opening, the asked-for columns are decoded once, batch by batch, into an
    Arrow file in :func:`cache_dir` (named by the Parquet file's fingerprint and the columns, so a changed file gets
    a new copy), which every process then memory-maps and reads record by record.
    """

    format = "parquet"

    def _count(self) -> int:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        self.schema_names = tuple(parquet.schema_arrow.names)
        n = parquet.metadata.num_rows
        keep = [c for c in self.columns if c in self.schema_names] or list(self.schema_names)
        # the file's modification time too: a rewrite that keeps the size can miss the sampled blocks of the hash
        stamp = os.stat(self.path).st_mtime_ns
        key = hashlib.sha256(f"{_file_hash(self.path, n)}|{stamp}|{keep}".encode()).hexdigest()[:16]
        self.cache = os.path.join(cache_dir(), f"{os.path.basename(self.path)}.{key}.arrow")
        if not os.path.isfile(self.cache):
            self._decode(parquet, keep)
        return n

    def _decode(self, parquet, keep: list[str]) -> None:
        import pyarrow as pa

        os.makedirs(os.path.dirname(self.cache), exist_ok=True)
        partial = f"{self.cache}.{os.getpid()}.partial"
        schema = pa.schema([parquet.schema_arrow.field(c) for c in keep])
        with pa.ipc.new_file(partial, schema) as writer:
            for batch in parquet.iter_batches(batch_size=4096, columns=keep):
                writer.write_batch(batch)
        os.replace(partial, self.cache)   # atomic: processes decoding the same file at once agree

    def _open(self):
        return _mapped_table(self.cache)


class ArrowFile(_TableFile):
    """An Arrow IPC file or stream (``datasets``' ``save_to_disk`` shards), memory-mapped."""

    format = "arrow"

    def _open(self):
        table = _mapped_table(self.path)
        self.schema_names = tuple(table.column_names)    # the file's, before selecting (errors list them)
        keep = [c for c in self.columns if c in table.column_names]
        return table.select(keep) if keep else table

    def _count(self) -> int:
        return self.handle().num_rows


class ArrayRecordFile(_File):
    """An ArrayRecord file whose records are JSON objects' UTF-8 bytes; ``where`` is ``path:record i``."""

    format = "array_record"

    def _open(self):
        from array_record.python import array_record_data_source

        return array_record_data_source.ArrayRecordDataSource([self.path])

    def _count(self) -> int:
        return len(self.handle())

    def where(self, i: int) -> str:
        return f"{self.path}:record {i}"

    def get(self, i: int) -> tuple[str, Any]:
        return self.where(i), self.handle()[i]


_CLASSES = {"jsonl": JsonlFile, "parquet": ParquetFile, "arrow": ArrowFile, "array_record": ArrayRecordFile}


class Source:
    """Files of one format read as one sequence of records: ``source[i] -> (where, raw)``.

    Args:
        files: opened files (:class:`JsonlFile`, ...), in order.
        name: what the messages call it (the path the user gave).
    """

    def __init__(self, files: Sequence[_File], name: str = ""):
        self.files = list(files)
        self.name = name or (self.files[0].path if len(self.files) == 1 else f"{len(self.files)} files")
        self._starts = np.cumsum([0] + [len(f) for f in self.files]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> tuple[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {self.name} ({len(self)} records)")
        k = bisect.bisect_right(self._starts, i) - 1
        return self.files[k].get(i - self._starts[k])

    def fingerprint(self) -> str:
        """16 hex digits naming the data: every file's format, size, record count and sampled bytes, in order (not
        the paths: moved files keep it)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.format}|{f.fingerprint()}\n".encode())
        return h.hexdigest()[:16]

    def scan(self):
        """``(where, raw)`` of every record, in order, each file read in one pass."""
        for f in self.files:
            yield from f.scan()

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {len(self.files)} file(s), {len(self)} records)"


def fingerprint(source: Source) -> str:
    """16 hex digits naming the data of ``source`` (a :class:`Subset` names its records too): ``source.fingerprint()``."""
    return source.fingerprint()


def _state_json_files(folder: str) -> list[str] | None:
    """The shard files a ``datasets`` ``save_to_disk`` folder lists in its ``state.json``, or None."""
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state, encoding="utf-8") as f:
        names = [d["filename"] for d in json.load(f).get("_data_files", [])]
    return [os.path.join(folder, n) for n in names] or None


_HUB_SHARD = re.compile(r"(.+?)-\d{5}-of-\d{5}")   # a split's shard as the Hub and `datasets` name them
# The words by which `datasets` tells a file's split from its name (train.jsonl, test.parquet, dev-0.arrow, ...)
_SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
                "evaluation": "test"}


def _split_of(name: str) -> str | None:
    """The split a data file's name says, as ``datasets`` reads a folder, or None.

    Examples:
        >>> [_split_of(n) for n in ("train-00000-of-00002.parquet", "test.jsonl", "my_dev_set.arrow", "qa.jsonl")]
        ['train', 'test', 'validation', None]
    """
    shard = _HUB_SHARD.match(name)
    if shard:
        return shard.group(1)
    return next((_SPLIT_WORDS[w] for w in re.split(r"[-._ \d]+", name.lower()) if w in _SPLIT_WORDS), None)


def expand(path: str | os.PathLike) -> list[str]:
    """The data files a path means: a file; a folder (``save_to_disk``'s ``state.json`` order, else the one format's
    files in name order, looking into ``data/`` as the Hub's layout has it); or a glob pattern.

    Raises:
        FileNotFoundError: nothing there.
        DataError: a folder of several formats, or of none, or of ``datasets`` splits or the Hub's split files
            (name one).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        listed = _state_json_files(path)
        if listed:
            return listed
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            splits = sorted(p for p in os.listdir(path) if os.path.isdir(os.path.join(path, p)))
            raise DataError(f"{path!r} is a `datasets` DatasetDict folder with splits {splits}; name one of them, "
                            f"e.g. {os.path.join(path, splits[0]) if splits else path + '/train'}")
        names = sorted(p for p in os.listdir(path) if os.path.isfile(os.path.join(path, p)))
        data = [n for n in names if any(n.endswith(s) or f"{s}-" in n for s in _SUFFIXES)]
        if not data and os.path.isdir(os.path.join(path, "data")):
            return expand(os.path.join(path, "data"))
        split = {n: _split_of(n) for n in data}
        splits = sorted(set(split.values()) - {None})
        if len(splits) > 1:      # the Hub's layouts: train-00000-of-00002.parquet, or train.jsonl beside test.jsonl
            pick = "train" if "train" in splits else splits[0]
            mine = [n for n in data if split[n] == pick]
            name = f"{pick}-*" if _HUB_SHARD.match(mine[0]) else mine[0] if len(mine) == 1 else f"*{pick}*"
            example = os.path.join(path, name)
            raise DataError(f"data folder {path!r} holds the splits {splits} (by file name, as `datasets` reads a "
                            f"folder), which would all be read as one; name one split's files, e.g. {example!r}")
        formats = sorted({format_of(n) for n in data})
        if len(formats) != 1:
            raise DataError(f"data folder {path!r} holds " + (f"files of several formats ({', '.join(formats)}); "
                                                              f"point at one file, or a glob such as {path}/*.parquet"
                                                              if formats else
                                                              f"no data files ({', '.join(names[:5]) or 'nothing'}); "
                                                              f"expected *.jsonl, *.parquet, *.arrow or *.array_record"))
        return [os.path.join(path, n) for n in data]
    matches = sorted(glob.glob(path))
    files = [m for m in matches if os.path.isfile(m)]
    if files:
        return files
    raise FileNotFoundError(f"data {path!r} not found (cwd {os.getcwd()!r}): no such file, folder or glob match")


def open_source(paths: str | os.PathLike | Sequence[str | os.PathLike], *, columns: Sequence[str] = ()) -> Source:
    """Opens data files (see :func:`expand` for what a path may be) as one :class:`Source`.

    Args:
        paths: a path, or several (their files concatenate in the order given).
        columns: for Parquet and Arrow, the columns to read (others are never decoded); () reads all.

    Raises:
        FileNotFoundError: a path that names nothing.
        DataError: an empty file (an empty shard is named), files of several formats.
    """
    given = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    files = [f for p in given for f in expand(p)]
    formats = sorted({format_of(f) for f in files})
    if len(formats) > 1:
        raise DataError(f"data files of several formats ({', '.join(formats)}) in {given}; use one format")
    opened = []
    for path in files:
        f = _CLASSES[formats[0]](path, columns)
        if not len(f):
            kind = "an empty shard" if len(files) > 1 else "empty"
            raise DataError(f"data file {path!r} holds no records ({kind}); remove it or write records to it")
        opened.append(f)
    return Source(opened, given[0] if len(given) == 1 else "")


class Subset(Source):
    """Some records of a source, by index (a train/validation split of one data set)."""

    def __init__(self, source: Source, indices: np.ndarray, name: str = ""):
        self.files, self.parent = source.files, source
        self.indices = np.asarray(indices, np.int64)
        self.name = name or source.name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[str, Any]:
        return self.parent[int(self.indices[i])]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.parent.fingerprint().encode() + self.indices.tobytes()).hexdigest()[:16]

    def scan(self):
        """``(where, raw)`` of this subset's records, in its order: one pass over the parent when the indices
        ascend (as :func:`split` makes them), else one read per record."""
        if np.all(np.diff(self.indices) > 0):
            wanted = iter(self.indices.tolist())
            nxt = next(wanted, None)
            for i, record in enumerate(self.parent.scan()):
                if nxt is None:
                    return
                if i == nxt:
                    yield record
                    nxt = next(wanted, None)
        else:
            for i in range(len(self)):
                yield self[i]


def held_out_mask(n: int, k: int, seed: int) -> np.ndarray:
    """Which of ``n`` records a seeded split holds out (``k`` of them): the one rule both :func:`split` and
    :func:`jlora.data.records.split` follow, so a list and a file of the same records split alike."""
    held = np.zeros(n, bool)
    held[np.random.default_rng([seed, 0x5EED]).permutation(n)[:k]] = True
    return held


def split(source: Source, *, valid_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """A seeded (train, valid) split of a source's records, the same split :func:`jlora.data.split` makes of a list
    (both keep the records' order).

    Examples:
        >>> from jlora.data.records import split as split_list
        >>> class Ten(Source):
        ...     def __len__(self): return 10
        ...     def __getitem__(self, i): return f"r{i}", i
        >>> train, valid = split(Ten([], "ten"), valid_fraction=0.3, seed=1)
        >>> [valid[i][1] for i in range(len(valid))] == split_list(list(range(10)), valid_fraction=0.3, seed=1)[1]
        True
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"`valid_fraction` must be in (0, 1); got {valid_fraction}")
    n = len(source)
    k = max(1, round(n * valid_fraction))
    if k >= n:
        raise ValueError(f"cannot hold out {k} validation examples from {n}; leave at least one for training")
    held = held_out_mask(n, k, seed)
    return (Subset(source, np.flatnonzero(~held), f"{source.name} (train split)"),
            Subset(source, np.flatnonzero(held), f"{source.name} (validation split)"))
