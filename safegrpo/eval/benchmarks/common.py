"""What every benchmark adapter shares: the item constructor, the error type, and readers of
JSON, CSV and text files and images that name the file and the item in their errors (see the
package's docstring for the contract).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

from ...data.records import SafeTagRecord

# ../shared/benchmarks beside the project (the samples CI has); users pass their own paths
SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "benchmarks"


class BenchmarkError(ValueError):
    """Bad benchmark data; the message names the file and the item."""


def item(benchmark: str, item_id, prompt: str, images: list, tags: tuple, category: str,
         expected: str | None) -> SafeTagRecord:
    """One benchmark item as a record; `tags` = (image_tag, text_tag, combine_tag), None = undefined."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise BenchmarkError(f"{benchmark} item {item_id}: the instruction is empty or missing ({prompt!r})")
    v, t, c = tags
    return SafeTagRecord(prompt, images, v, t, c, {"benchmark": benchmark, "id": str(item_id),
                                                   "category": category, "expected": expected})


def expected_from(combine_tag: str | None) -> str | None:
    return {"unsafe": "refuse", "safe": "answer"}.get(combine_tag)


def open_image(path: Path, where: str, skip_missing: bool, report: list | None) -> Image.Image | None:
    """The RGB image at `path`; None (and a line in `report`) when missing and `skip_missing`."""
    if not path.is_file():
        if skip_missing:
            if report is not None:
                report.append((where, f"missing image {path}"))
            return None
        raise BenchmarkError(f"{where}: image not found: {path} (use --skip-missing to skip such items)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise BenchmarkError(f"{where}: cannot read image {path}: {e}") from e


def read_json(path: Path, expect: type):
    """The JSON document at `path`, which must be a `expect` (list or dict)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, expect):
        raise BenchmarkError(f"{path}: expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data


def json_items(path: Path, file_name: str, benchmark: str) -> tuple[Path, list[tuple[str, dict]]]:
    """(the file, [(where, item)]) of a benchmark whose items are a JSON list of objects; `path`
    is the file or the folder holding `file_name`."""
    meta = path / file_name if path.is_dir() else path
    if not meta.is_file():
        raise BenchmarkError(f"{benchmark}: {meta} not found (expected the benchmark's {file_name})")
    out = []
    for k, row in enumerate(read_json(meta, list)):
        where = f"{meta}: item {k}"
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}: not an object")
        out.append((where, row))
    return meta, out


def read_text(path: Path) -> str:
    """A text file as UTF-8; an undecodable byte is an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BenchmarkError(f"{path}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def csv_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for each data row of a CSV file, all read and checked first: `where` names
    the file and line; a row with too few fields (an unbalanced quote swallows the rest of the
    file into one field) or too many is an error, and so is a file without data rows."""
    import io
    rows = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise BenchmarkError(f"{where}: the row does not have the header's {len(reader.fieldnames)} fields "
                                     "(an unbalanced quote?)")
            rows.append((where, row))
    except csv.Error as e:
        raise BenchmarkError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise BenchmarkError(f"{path}: no data rows (an empty file or a header alone)")
    return rows


def require(row: dict, keys, where: str, types: dict | None = None) -> None:
    """Every key present and not null; those in `types` of that type (e.g. {"safe": bool})."""
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise BenchmarkError(f"{where}: missing or null field(s) {missing}; not the expected layout")
    for k, kind in (types or {}).items():
        if not isinstance(row[k], kind) or (kind is not bool and isinstance(row[k], bool)):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise BenchmarkError(f"{where}: field {k!r} must be a {name}, got {row[k]!r}")
