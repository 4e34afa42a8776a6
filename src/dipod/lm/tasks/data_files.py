"""Reading task data files, with errors that name the file and the line.

Also finds the paper's evaluation sets by file name (`data_file`): the copies shipped in the
package (``dipod/lm/data``, with their provenance), or the folder named by the environment
variable ``DIPOD_SHARED_DATA`` when it is set (a user's own copies of the same files).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

SHARED_DATA_ENV = "DIPOD_SHARED_DATA"
PACKAGED_DATA = Path(__file__).resolve().parents[1] / "data"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def data_file(filename: str) -> Path:
    """Path of a named evaluation file: from ``$DIPOD_SHARED_DATA`` when that is set, else the
    packaged copy. FileNotFoundError names the folder it looked in and how to point elsewhere."""
    override = os.environ.get(SHARED_DATA_ENV)
    folder = Path(override) if override else PACKAGED_DATA
    path = folder / filename
    if not path.is_file():
        where = f"{SHARED_DATA_ENV}={override}" if override else "the installed package (a broken install?)"
        raise FileNotFoundError(
            f"evaluation file {filename} not found in {folder} ({where}); unset {SHARED_DATA_ENV} to "
            f"use the packaged copy, point it at a folder holding {filename}, or pass the file with path=..."
        )
    return path


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    return path


@contextlib.contextmanager
def _utf8(path: Path):
    """A file in another encoding (UTF-16, Latin-1) as one message naming it, not a bare codec error."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object raises
    ValueError naming it."""
    path = existing_file(path)
    with _utf8(path), path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def read_csv(path: str | Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) per data row. Header names match case-insensitively; a
    missing column or a row with the wrong number of fields raises ValueError naming the line."""
    path = existing_file(path)
    with _utf8(path), path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header with columns {', '.join(columns)}")
        index = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in columns if c.lower() not in index]
        if missing:
            raise ValueError(
                f"{path}:1: missing column(s) {', '.join(missing)}; header is {','.join(header)}"
            )
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: {len(fields)} fields, header has {len(header)}"
                )
            yield reader.line_num, {c: fields[index[c.lower()]].strip() for c in columns}


def read_records(path: str, split: str, hub_config: str | None = None) -> Iterator[tuple[str, dict]]:
    """(location, row) for a local .json/.jsonl/.parquet file or a Hugging Face hub dataset id.

    `location` ("file:line" or "file row N" or "hub-id[split] row N") is for error messages.
    The hub is contacted only when `path` is not a local file and looks like a dataset id.
    """
    local = Path(path)
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            for line_number, row in read_jsonl(local):
                yield f"{local}:{line_number}", row
        elif suffix == ".json":
            yield from _read_json(local)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq  # installed with `datasets`

            for i, row in enumerate(pq.read_table(local).to_pylist()):
                yield f"{local} row {i}", row
        else:
            raise ValueError(f"{local}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        return
    if local.suffix.lower() in LOCAL_SUFFIXES or local.is_absolute() or not _HUB_ID.match(path):
        raise FileNotFoundError(f"data file {path} not found (and it is not a hub dataset id)")
    import datasets

    dataset = datasets.load_dataset(path, hub_config, split=split)
    for i, row in enumerate(dataset):
        yield f"{path}[{split}] row {i}", row


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with _utf8(path):
            data: Any = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style wrappers
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path} item {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{path} item {i}", row


def require_fields(row: dict, fields: tuple[str, ...], location: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise ValueError(f"{location}: missing field(s) {', '.join(missing)}; found {', '.join(map(str, row))}")
