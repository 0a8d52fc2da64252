"""SafeTag records and their two on-disk layouts.

A record is one image-instruction pair with three gold tags (docs/METHOD.md, section 2):
    SafeTagRecord(prompt, images, image_tag, text_tag, combine_tag, meta)
`images` is a list of RGB PIL images (empty for text-only items); `meta` keeps any extra
columns (SafeTag-Synth stores its concept, instruction and group there).

Layouts read and written:
  * parquet, as the published SafeTag-VL-3K (Hugging Face datasets) writes it: columns `prompt`,
    `images` (a list whose items are raw bytes, a {"bytes", "path"} struct, or a file path),
    `image_tag`, `text_tag`, `combine_tag`; a path may be one file or a folder of `*.parquet`
    (optionally `<split>-*.parquet` picked with `split=`);
  * JSONL, one object per line with the same keys, `images` holding paths relative to the
    JSONL file's folder (or `image_root`).

Tag values are `safe`/`unsafe`, case-insensitive, surrounding whitespace ignored. Any other
value, a missing column, text that is not valid UTF-8 (bad bytes, lone surrogates), an
unreadable or missing image, an image path that leaves the data folder (unless
`allow_outside=True`) or an empty file raises one `SafeTagError` naming the file and the row.
Nothing is dropped silently: `skip_invalid=True` skips bad rows, logs how many and which, and
appends a `LoadReport` per file to the list given as `report=`; a file left with no valid row is
an error of its own. `record.origin` says where a record came from ("file: row N"), for errors
found later (an overlong prompt, say).
Images are decoded once, at load, and with `max_pixels` > 0 shrunk (aspect kept) to at most that
many pixels, the processor's own limit: an 8000 x 8000 photo is kept as a small copy, not 190 MB.
Writers write to a temporary name and rename, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..files import atomic_path

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "images", "image_tag", "text_tag", "combine_tag")
TAG_COLUMNS = ("image_tag", "text_tag", "combine_tag")


class SafeTagError(ValueError):
    """Bad SafeTag data; the message names the file and the row."""


@dataclass
class SafeTagRecord:
    prompt: str
    images: list  # list[PIL.Image.Image], RGB
    image_tag: str
    text_tag: str
    combine_tag: str
    meta: dict = field(default_factory=dict)
    origin: str = field(default="", compare=False, repr=False)     # "file: row N", for later errors

    @property
    def tags(self) -> dict:
        """The gold tags in the form the reward takes (`extra_info`)."""
        return {"image_tag": self.image_tag, "text_tag": self.text_tag, "combine_tag": self.combine_tag}


@dataclass
class LoadReport:
    """What a loader skipped (only with skip_invalid=True): [(row, reason)]."""
    path: str
    skipped: list = field(default_factory=list)


def normalize_tag(value, where: str, column: str) -> str:
    if isinstance(value, str) and value.strip().lower() in ("safe", "unsafe"):
        return value.strip().lower()
    raise SafeTagError(f"{where}: column {column!r} must be 'safe' or 'unsafe' (any case), got {value!r}")


def _resolve(item: str, base: Path, where: str, allow_outside: bool) -> Path:
    """An image path of the data file, under `base` unless allow_outside."""
    p = (base / item).resolve()
    if not allow_outside and not p.is_relative_to(base.resolve()):
        raise SafeTagError(f"{where}: image path {item!r} leads outside {base.resolve()} "
                           "(set data.allow_outside_images: true to allow it)")
    if not p.is_file():
        raise SafeTagError(f"{where}: image file not found: {p}")
    return p


def _open_image(item, base: Path, where: str, max_pixels: int = 0, allow_outside: bool = False) -> Image.Image:
    """Decode one `images` entry (bytes, {"bytes", "path"} struct, or a path) to RGB, shrunk to
    at most max_pixels pixels (0: as is)."""
    try:
        if isinstance(item, dict):
            if item.get("bytes") is not None:
                item = item["bytes"]
            elif item.get("path"):
                item = item["path"]
            else:
                raise SafeTagError(f"{where}: image struct has neither bytes nor path")
        if isinstance(item, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(item)))
        elif isinstance(item, str):
            img = Image.open(_resolve(item, base, where, allow_outside))
        else:
            raise SafeTagError(f"{where}: unsupported image entry of type {type(item).__name__}")
        w, h = img.size
        size = None
        if max_pixels and w * h > max_pixels:
            scale = math.sqrt(max_pixels / (w * h))
            size = (max(1, int(w * scale)), max(1, int(h * scale)))
            img.draft("RGB", size)            # JPEG: decode at a fraction of the full size
        img.load()
        img = img.convert("RGB")
        return img.resize(size, Image.BICUBIC) if size else img
    except SafeTagError:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise SafeTagError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e


def _check_text(row: dict, where: str) -> None:
    """Every string of a row must be valid UTF-8 text (a lone surrogate is not)."""
    for key, value in row.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise SafeTagError(f"{where}: column {key!r} is not valid UTF-8 text ({e.reason} at "
                                   f"character {e.start})") from None


def _record_from_row(row: dict, where: str, base: Path, max_pixels: int = 0,
                     allow_outside: bool = False) -> SafeTagRecord:
    _check_text(row, where)
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise SafeTagError(f"{where}: column 'prompt' must be a non-empty string, got {prompt!r}")
    images = row["images"]
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        raise SafeTagError(f"{where}: column 'images' must be a list, got {type(images).__name__}")
    tags = {c: normalize_tag(row[c], where, c) for c in TAG_COLUMNS}
    meta = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS}
    imgs = [_open_image(it, base, f"{where}, image {j}", max_pixels, allow_outside) for j, it in enumerate(images)]
    return SafeTagRecord(prompt, imgs, meta=meta, origin=where, **tags)


def _rows_to_records(rows, path: Path, base: Path, skip_invalid: bool, report: LoadReport, **kw) -> list[SafeTagRecord]:
    """rows: (row, error or None) per row of the file."""
    out = []
    for i, (row, error) in enumerate(rows):
        where = f"{path}: row {i}"
        try:
            if error is not None:
                raise SafeTagError(f"{where}: {error}")
            out.append(_record_from_row(row, where, base, **kw))
        except SafeTagError as e:
            if not skip_invalid:
                raise
            report.skipped.append((i, str(e)))
    return out


def _none_left(path, report: LoadReport, n_rows: int):
    if n_rows and len(report.skipped) == n_rows:
        raise SafeTagError(f"{path}: no valid row left: all {n_rows} rows were skipped (skip_invalid); "
                           f"first reason: {report.skipped[0][1]}")


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SafeTagError(f"{path}: no such file or folder")
    files = sorted(path.rglob(f"{split}-*.parquet" if split else "*.parquet"))
    if not files:
        raise SafeTagError(f"{path}: no {split + '-*' if split else '*'}.parquet files found")
    return files


def _table_rows(table) -> list[tuple[dict | None, str | None]]:
    """(row, None) per row, or (None, reason) for a row pyarrow cannot turn into Python strings
    (bytes that are not UTF-8 in a string column)."""
    try:
        return [(r, None) for r in table.to_pylist()]
    except UnicodeDecodeError:
        out = []
        for i in range(table.num_rows):
            try:
                out.append((table.slice(i, 1).to_pylist()[0], None))
            except UnicodeDecodeError as e:
                out.append((None, f"text is not valid UTF-8 ({e.reason} at byte {e.start})"))
        return out


def load_parquet(path, split: str | None = None, image_root=None, skip_invalid: bool = False,
                 limit: int | None = None, report: list | None = None, max_pixels: int = 0,
                 allow_outside: bool = False) -> list[SafeTagRecord]:
    """Load SafeTag records from one parquet file or a folder of them (HF datasets layout)."""
    import pyarrow.parquet as pq

    records, reports = [], []
    for f in _parquet_files(Path(path), split):
        try:
            table = pq.read_table(f)
        except Exception as e:
            raise SafeTagError(f"{f}: not a readable parquet file ({e})") from e
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise SafeTagError(f"{f}: missing column(s) {missing}; found {table.column_names}")
        if table.num_rows == 0:
            raise SafeTagError(f"{f}: empty file (0 rows)")
        rows = _table_rows(table.slice(0, limit) if limit else table)
        file_report = LoadReport(str(f))
        base = Path(image_root) if image_root else f.parent
        records += _rows_to_records(rows, f, base, skip_invalid, file_report, max_pixels=max_pixels,
                                    allow_outside=allow_outside)
        _none_left(f, file_report, len(rows))
        reports.append(file_report)
    _log_reports(reports, report)
    return records


def load_jsonl(path, image_root=None, skip_invalid: bool = False, limit: int | None = None,
               report: list | None = None, max_pixels: int = 0, allow_outside: bool = False) -> list[SafeTagRecord]:
    """Load SafeTag records from a JSONL file; image paths are relative to its folder or image_root."""
    path = Path(path)
    if not path.is_file():
        raise SafeTagError(f"{path}: no such file")
    base = Path(image_root) if image_root else path.parent
    file_report, records, n_rows = LoadReport(str(path)), [], 0
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            if not raw.strip():
                continue
            n_rows += 1
            where = f"{path}: row {i}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SafeTagError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise SafeTagError(f"{where}: malformed JSON ({e})") from None
                if not isinstance(row, dict):
                    raise SafeTagError(f"{where}: a line must hold one JSON object")
                missing = [c for c in REQUIRED_COLUMNS if c not in row]
                if missing:
                    raise SafeTagError(f"{where}: missing key(s) {missing}")
                records.append(_record_from_row(row, where, base, max_pixels, allow_outside))
            except SafeTagError as e:
                if not skip_invalid:
                    raise
                file_report.skipped.append((i, str(e)))
            if limit and len(records) >= limit:
                break
    if n_rows == 0:
        raise SafeTagError(f"{path}: empty file (0 rows)")
    _none_left(path, file_report, n_rows)
    _log_reports([file_report], report)
    return records


def load_safetag(path, split: str | None = None, **kw) -> list[SafeTagRecord]:
    """Load either layout: `*.jsonl` is JSONL, anything else parquet (file or folder)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_jsonl(path, **kw)
    if path.is_dir() and split and (path / f"{split}.jsonl").is_file():
        return load_jsonl(path / f"{split}.jsonl", **kw)
    return load_parquet(path, split=split, **kw)


def _log_reports(reports, out: list | None):
    skipped = [r for r in reports if r.skipped]
    if out is not None:
        out.extend(skipped)
    for r in skipped:
        rows = ", ".join(str(i) for i, _ in r.skipped[:20]) + (" ..." if len(r.skipped) > 20 else "")
        log.warning("%s: skipped %d invalid row(s) (skip_invalid=True): rows %s; first reason: %s",
                    r.path, len(r.skipped), rows, r.skipped[0][1])


# ------------------------------------------------------------------------------------- writing
def png_bytes(img: Image.Image) -> bytes:
    """A PIL image encoded as PNG (parquet image structs, endpoint data URLs)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(records, path) -> Path:
    """Write records in the HF layout (images as {"bytes", "path"} PNG structs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    meta_keys = sorted({k for r in records for k in r.meta})
    cols = {"prompt": [r.prompt for r in records],
            "images": [[{"bytes": png_bytes(im), "path": None} for im in r.images] for r in records]}
    for c in TAG_COLUMNS:
        cols[c] = [getattr(r, c) for r in records]
    for k in meta_keys:
        cols[k] = [r.meta.get(k) for r in records]
    img_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    schema = pa.schema([("prompt", pa.string()), ("images", img_type)] + [(c, pa.string()) for c in TAG_COLUMNS]
                       + [(k, pa.infer_type(cols[k])) for k in meta_keys])
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols, schema=schema), tmp)
    return path


def write_jsonl(records, path, image_dir: str = "images") -> Path:
    """Write records as JSONL + PNG files under `<jsonl folder>/<image_dir>/`."""
    path = Path(path)
    img_dir = path.parent / image_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, r in enumerate(records):
            rels = []
            for j, im in enumerate(r.images):
                rel = f"{image_dir}/{path.stem}_{i:06d}_{j}.png"
                with atomic_path(path.parent / rel) as img_tmp:
                    im.save(img_tmp, format="PNG")
                rels.append(rel)
            row = {"prompt": r.prompt, "images": rels, **r.tags, **r.meta}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
