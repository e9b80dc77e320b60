"""Label tables: a CSV file with one row per photo, joined to a photo folder by file name.

The CSV is comma-separated, UTF-8 (a BOM is allowed), with a header row. One column names the
photo (auto-detected among ``file``, ``filename``, ``image``, ``path``, any case); the others are
labels, kept as strings exactly as written (CelebA attributes are "-1"/"1", UTKFace gender is
"male"/"female"). :func:`to_numeric` / :meth:`LabelTable.numeric` turn a column into numbers.

Only header names and key cells are stripped of surrounding spaces; keys also get "\\" -> "/"
and a leading "./" removed, so that they compare with a folder's POSIX relative paths.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError

__all__ = ["KEY_COLUMNS", "LabelTable", "read_labels", "to_numeric"]

KEY_COLUMNS = ("file", "filename", "image", "path")
_MATCH_MODES = ("auto", "relpath", "basename")


def _norm_key(key: str) -> str:
    k = key.strip().replace("\\", "/")
    while k.startswith("./"):
        k = k[2:]
    return k


def _examples(items, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


@dataclass(frozen=True)
class LabelTable:
    """A label CSV in memory: keys (photo names) and string values per column, in file order.

    Attributes
    ----------
    path : str
        The CSV file.
    key_column : str
        The header of the column naming the photos.
    columns : tuple of str
        The label columns (every column but the key), in file order.
    keys : tuple of str
        Normalised photo names, one per row.
    rows : tuple of tuple of str
        Label values per row, aligned with ``columns``.
    lines : tuple of int
        The CSV line number of each row (for messages).
    """

    path: str
    key_column: str
    columns: tuple[str, ...]
    keys: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    lines: tuple[int, ...]
    _col: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_col", {c: j for j, c in enumerate(self.columns)})

    def __len__(self) -> int:
        return len(self.keys)

    def _col_index(self, name: str) -> int:
        if name not in self._col:
            raise DataError(
                f"label table {self.path!r} has no column {name!r}; its columns are {_examples(self.columns, 8)}"
            )
        return self._col[name]

    def column(self, name: str) -> list[str]:
        """All values of a column, in file order."""
        j = self._col_index(name)
        return [r[j] for r in self.rows]

    def row(self, key: str) -> dict[str, str]:
        """column -> value for the row whose key is ``key`` (exact, after normalisation)."""
        k = _norm_key(key)
        for i, kk in enumerate(self.keys):
            if kk == k:
                return dict(zip(self.columns, self.rows[i]))
        raise DataError(f"label table {self.path!r} has no row for {key!r}")

    def values_at(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> dict[str, list[str]]:
        """column -> values for the given row positions (as returned by :meth:`match`)."""
        cols = self.columns if columns is None else tuple(columns)
        return {c: [self.rows[i][self._col_index(c)] for i in rows] for c in cols}

    def match(self, relpaths: Sequence[str], *, how: str = "auto", root: str | None = None) -> list[int]:
        """The row position for each photo relative path (POSIX, as in ``FaceFolder.relpaths``).

        ``how="relpath"``: the key must equal the relative path. ``how="basename"``: the file
        names must be equal (both unique). ``how="auto"`` (default), per photo, first match of:
        the key equals the relative path; the key ends with "/" + relative path (the CSV was
        written relative to a parent folder, e.g. ``images/10036/009670.jpg`` for a folder
        ``images``); the relative path ends with "/" + key (the CSV names files inside
        sub-folders, or bare file names). A match must be unique and no two photos may share a row.

        Raises
        ------
        DataError
            Naming the photos without a row (how many, examples, what to do) or ambiguous ones.
        """
        if how not in _MATCH_MODES:
            raise InputError(f"how must be one of {', '.join(_MATCH_MODES)}, got {how!r}")
        where = f"photo folder {root!r}" if root else "the photos"
        exact = {k: i for i, k in enumerate(self.keys)}
        found: list[int | None] = []
        ambiguous: list[str] = []
        if how == "basename":
            by_base: dict[str, list[int]] = {}
            for i, k in enumerate(self.keys):
                by_base.setdefault(k.rsplit("/", 1)[-1], []).append(i)
            bases = [r.rsplit("/", 1)[-1] for r in relpaths]
            dup_photos = {b for b, c in Counter(bases).items() if c > 1}
            if dup_photos:
                raise DataError(
                    f"cannot join label table {self.path!r} to {where} by file name: several photos share "
                    f"the names {_examples(sorted(dup_photos))}; join by relative path (how='auto')"
                )
            for b in bases:
                rows = by_base.get(b, [])
                if len(rows) > 1:
                    ambiguous.append(b)
                found.append(rows[0] if len(rows) == 1 else None)
        else:
            by_suffix: dict[str, list[int]] = {}
            if how == "auto":
                for i, k in enumerate(self.keys):
                    parts = k.split("/")
                    for s in range(1, len(parts)):
                        by_suffix.setdefault("/".join(parts[s:]), []).append(i)
            for rel in relpaths:
                if rel in exact:
                    found.append(exact[rel])
                    continue
                if how == "relpath":
                    found.append(None)
                    continue
                longer = by_suffix.get(rel, [])
                if len(longer) == 1:
                    found.append(longer[0])
                    continue
                if len(longer) > 1:
                    ambiguous.append(rel)
                    found.append(None)
                    continue
                parts = rel.split("/")
                hit = None
                for s in range(1, len(parts)):
                    tail = "/".join(parts[s:])
                    if tail in exact:
                        hit = exact[tail]
                        break
                found.append(hit)
        if ambiguous:
            raise DataError(
                f"label table {self.path!r} matches {len(ambiguous)} photos of {where} more than once "
                f"(e.g. {_examples(ambiguous, 3)}); give full relative paths in column {self.key_column!r}"
            )
        missing = [r for r, f in zip(relpaths, found) if f is None]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(relpaths)} photos in {where} have no row in label table "
                f"{self.path!r} (key column {self.key_column!r}): {_examples(missing)}; its keys look like "
                f"{_examples(self.keys, 2)}. Add rows for them, remove the photos, select fewer with "
                "limit=, or load without labels"
            )
        rows = [int(f) for f in found]  # type: ignore[arg-type]
        if len(set(rows)) != len(rows):
            seen: dict[int, str] = {}
            clash = []
            for r, i in zip(relpaths, rows):
                if i in seen:
                    clash.append(f"{seen[i]} and {r} -> {self.keys[i]}")
                seen[i] = r
            raise DataError(
                f"label table {self.path!r}: several photos of {where} match the same row "
                f"({_examples(clash, 3)}); give full relative paths in column {self.key_column!r}"
            )
        return rows

    def select(self, relpaths: Sequence[str], columns: Sequence[str] | None = None, *, how: str = "auto"):
        """column -> values (strings) for the given photo relative paths (see :meth:`match`)."""
        return self.values_at(self.match(relpaths, how=how), columns)

    def numeric(
        self, column: str, relpaths: Sequence[str] | None = None, *, allow_missing: bool = False
    ) -> np.ndarray:
        """A column as float64, for all rows or for the given photos (see :func:`to_numeric`)."""
        j = self._col_index(column)
        if relpaths is None:
            rows = list(range(len(self)))
        else:
            rows = self.match(relpaths)
        values = [self.rows[i][j] for i in rows]
        where = [f"{self.keys[i]} (line {self.lines[i]})" for i in rows]
        return _to_numeric(values, f"column {column!r} of {self.path!r}", allow_missing, where)


def to_numeric(values: Sequence[str], name: str = "values", *, allow_missing: bool = False) -> np.ndarray:
    """Parse label strings as float64 (e.g. CelebA "-1"/"1" -> -1.0/1.0).

    Blank cells become NaN if ``allow_missing``, else raise DataError; a cell that is not a
    number ("male", "n/a") raises DataError naming it and its position.
    """
    return _to_numeric(list(values), name, allow_missing, None)


def _to_numeric(values, name, allow_missing, where) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        s = "" if v is None else str(v).strip()
        at = where[i] if where is not None else f"position {i}"
        if not s:
            if not allow_missing:
                raise DataError(
                    f"{name} is blank at {at}; pass allow_missing=True to read blanks as NaN"
                )
            out[i] = np.nan
            continue
        try:
            x = float(s)
        except ValueError:
            raise DataError(f"{name} holds {v!r} at {at}, which is not a number") from None
        if not np.isfinite(x):
            raise DataError(f"{name} holds {v!r} at {at}; only finite numbers are accepted")
        out[i] = x
    return out


def read_labels(csv_path, key_column: str | None = None) -> LabelTable:
    """Read a comma-separated label table with a header row.

    Parameters
    ----------
    csv_path : str or Path
    key_column : str or None
        The column naming the photos; if None, the one column named file, filename, image or
        path (any case).

    Raises
    ------
    DataError
        If the file is missing or unreadable, has no header or no rows, duplicate column names,
        no (or several candidate) key columns, a row with the wrong number of cells, a blank
        key, or duplicate keys (all named with their line numbers).
    """
    if not isinstance(csv_path, (str, os.PathLike)):
        raise InputError(f"csv_path must be a path, got {type(csv_path).__name__} {csv_path!r}")
    path = Path(csv_path).expanduser()
    where = f"label table {str(path)!r}"
    if not path.is_file():
        raise DataError(f"{where} does not exist or is not a file; check the path")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = [(n, row) for n, row in enumerate(csv.reader(f, strict=True), start=1)]
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{where} is not valid CSV ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {where} ({e.strerror or e})") from None
    records = [(n, r) for n, r in records if r and any(c.strip() for c in r)]  # blank lines
    if not records:
        raise DataError(f"{where} is empty; it needs a header row (e.g. file,age) and one row per photo")
    header_line, header = records[0]
    header = [h.strip() for h in header]
    dup = sorted(h for h, c in Counter(header).items() if c > 1)
    if dup:
        raise DataError(f"{where} has duplicate column names {_examples(dup)} in its header (line {header_line})")
    if key_column is None:
        cands = [h for h in header if h.lower() in KEY_COLUMNS]
        if not cands:
            hint = " (is it comma-separated?)" if len(header) == 1 else ""
            raise DataError(
                f"{where} has no column naming the photos{hint}: looked for {', '.join(KEY_COLUMNS)}, found "
                f"{_examples(header, 8)}; pass key_column= to name it"
            )
        if len(cands) > 1:
            raise DataError(
                f"{where} has several columns that could name the photos ({_examples(cands)}); "
                "pass key_column= to choose one"
            )
        key_column = cands[0]
    elif not isinstance(key_column, str):
        raise InputError(f"key_column must be a str or None, got {type(key_column).__name__} {key_column!r}")
    elif key_column not in header:
        raise DataError(f"{where} has no column {key_column!r}; its columns are {_examples(header, 8)}")
    kj = header.index(key_column)
    columns = tuple(h for j, h in enumerate(header) if j != kj)
    keys: list[str] = []
    rows: list[tuple[str, ...]] = []
    lines: list[int] = []
    for n, r in records[1:]:
        if len(r) != len(header):
            raise DataError(
                f"{where} line {n} has {len(r)} cells, the header has {len(header)}; fix or remove that row"
            )
        k = _norm_key(r[kj])
        if not k:
            raise DataError(f"{where} line {n} has a blank {key_column!r}; every row must name its photo")
        keys.append(k)
        rows.append(tuple(c for j, c in enumerate(r) if j != kj))
        lines.append(n)
    if not keys:
        raise DataError(f"{where} has a header but no rows")
    first: dict[str, int] = {}
    dups = []
    for k, n in zip(keys, lines):
        if k in first:
            dups.append(f"{k} (lines {first[k]} and {n})")
        else:
            first[k] = n
    if dups:
        raise DataError(f"{where} names {len(dups)} photos more than once: {_examples(dups, 3)}; keep one row per photo")
    return LabelTable(str(path), key_column, columns, tuple(keys), tuple(rows), tuple(lines))
