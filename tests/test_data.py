"""SafeTag loaders: the HF parquet layout, JSONL + images, round trips and clear errors."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from safegrpo.data.records import SafeTagError, SafeTagRecord, load_jsonl, load_parquet, load_safetag, write_jsonl, write_parquet


def img(colour, size=(20, 10)):
    return Image.new("RGB", size, colour)


def png(colour):
    b = io.BytesIO()
    img(colour).save(b, format="PNG")
    return b.getvalue()


def hf_parquet(path, rows):
    """A parquet file as Hugging Face datasets writes an Image-list column."""
    t = pa.table({"prompt": [r[0] for r in rows],
                  "images": pa.array([r[1] for r in rows],
                                     type=pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                  "image_tag": [r[2] for r in rows], "text_tag": [r[3] for r in rows],
                  "combine_tag": [r[4] for r in rows]})
    pq.write_table(t, path)


def test_reads_hf_parquet_layout(tmp_path):
    hf_parquet(tmp_path / "train-00000-of-00001.parquet", [
        ("What is this?", [{"bytes": png("red"), "path": "a.png"}], "Safe ", " safe", "SAFE"),
        ("Two images", [{"bytes": png("blue"), "path": None}, {"bytes": png("green"), "path": None}],
         "unsafe", "safe", "Unsafe"),
    ])
    recs = load_parquet(tmp_path, split="train")
    assert [r.prompt for r in recs] == ["What is this?", "Two images"]
    assert [(r.image_tag, r.text_tag, r.combine_tag) for r in recs] == [("safe", "safe", "safe"),
                                                                         ("unsafe", "safe", "unsafe")]
    assert recs[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert len(recs[1].images) == 2 and recs[1].images[1].getpixel((3, 3)) == (0, 128, 0)


def test_image_items_as_raw_bytes_and_paths(tmp_path):
    img("red").save(tmp_path / "r.png")
    t = pa.table({"prompt": ["a", "b"], "images": [[png("blue")], []], "image_tag": ["safe", "safe"],
                  "text_tag": ["safe", "unsafe"], "combine_tag": ["safe", "unsafe"]})
    pq.write_table(t, tmp_path / "raw.parquet")
    recs = load_parquet(tmp_path / "raw.parquet")
    assert recs[0].images[0].getpixel((0, 0)) == (0, 0, 255) and recs[1].images == []
    t2 = pa.table({"prompt": ["a"], "images": [["r.png"]], "image_tag": ["safe"], "text_tag": ["safe"],
                   "combine_tag": ["safe"]})
    pq.write_table(t2, tmp_path / "paths.parquet")
    assert load_parquet(tmp_path / "paths.parquet")[0].images[0].getpixel((0, 0)) == (255, 0, 0)


def test_round_trip_parquet_and_jsonl(tmp_path):
    recs = [SafeTagRecord("q1", [img("red")], "safe", "unsafe", "unsafe", {"concept": "apple", "group": "x"}),
            SafeTagRecord("q2", [img("blue"), img("white")], "unsafe", "safe", "unsafe", {"concept": "bomb", "group": "y"})]
    for back in (load_parquet(write_parquet(recs, tmp_path / "d.parquet")),
                 load_jsonl(write_jsonl(recs, tmp_path / "j" / "d.jsonl")),
                 load_safetag(tmp_path / "j" / "d.jsonl")):
        assert [(r.prompt, r.tags, r.meta) for r in back] == [(r.prompt, r.tags, r.meta) for r in recs]
        assert [[im.tobytes() for im in r.images] for r in back] == [[im.tobytes() for im in r.images] for r in recs]
    assert not list(tmp_path.glob("**/.*tmp*"))  # no temporaries left behind


@pytest.mark.parametrize("row,match", [
    ({"image_tag": "maybe"}, r"row 1: column 'image_tag' must be 'safe' or 'unsafe'"),
    ({"combine_tag": None}, r"row 1: column 'combine_tag'"),
    ({"images": ["missing.png"]}, r"row 1, image 0: image file not found"),
    ({"images": [{"bytes": b"not a png", "path": None}]}, r"row 1, image 0: unreadable image"),
    ({"prompt": ""}, r"row 1: column 'prompt'"),
])
def test_bad_rows_raise_naming_file_and_row(tmp_path, row, match):
    good = {"prompt": "ok", "images": [{"bytes": png("red"), "path": None}], "image_tag": "safe", "text_tag": "safe",
            "combine_tag": "safe"}
    bad = {**good, **row}
    rows = [good, bad]
    with open(tmp_path / "d.jsonl", "w") as fh:
        for r in rows:
            r = {**r, "images": [x if isinstance(x, str) else "img.png" for x in r["images"]]} \
                if not any(isinstance(x, dict) for x in r["images"]) else r
            fh.write(json.dumps(r, default=lambda b: None) + "\n")
    t = pa.table({k: [r[k] for r in rows] for k in good},
                 schema=pa.schema([("prompt", pa.string()), ("images", pa.list_(pa.struct([("bytes", pa.binary()),
                                                                                           ("path", pa.string())]))),
                                   ("image_tag", pa.string()), ("text_tag", pa.string()), ("combine_tag", pa.string())])) \
        if not any(isinstance(x, str) for x in bad["images"]) else None
    if t is not None:
        pq.write_table(t, tmp_path / "d.parquet")
        with pytest.raises(SafeTagError, match=str(tmp_path / "d.parquet") + ": " + match):
            load_parquet(tmp_path / "d.parquet")
        report = []
        recs = load_parquet(tmp_path / "d.parquet", skip_invalid=True, report=report)
        assert len(recs) == 1 and [i for i, _ in report[0].skipped] == [1]


def test_skip_invalid_reports_which_rows(tmp_path, caplog):
    img("red").save(tmp_path / "a.png")
    lines = [{"prompt": "ok", "images": ["a.png"], "image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"},
             {"prompt": "bad tag", "images": ["a.png"], "image_tag": "yes", "text_tag": "safe", "combine_tag": "safe"},
             "{not json",
             {"prompt": "no image", "images": ["nope.png"], "image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"}]
    (tmp_path / "d.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    with pytest.raises(SafeTagError, match=r"d.jsonl: row 1: column 'image_tag'"):
        load_jsonl(tmp_path / "d.jsonl")
    report = []
    recs = load_jsonl(tmp_path / "d.jsonl", skip_invalid=True, report=report)
    assert [r.prompt for r in recs] == ["ok"]
    assert sorted(i for i, _ in report[0].skipped) == [1, 2, 3]
    assert "skipped 3 invalid row(s)" in caplog.text


def test_missing_column_and_empty_file(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "images": [[]], "image_tag": ["safe"], "text_tag": ["safe"]}),
                   tmp_path / "m.parquet")
    with pytest.raises(SafeTagError, match=r"m.parquet: missing column\(s\) \['combine_tag'\]"):
        load_parquet(tmp_path / "m.parquet")
    schema = pa.schema([(c, pa.string()) for c in ("prompt", "image_tag", "text_tag", "combine_tag")]
                       + [("images", pa.list_(pa.binary()))])
    pq.write_table(schema.empty_table(), tmp_path / "e.parquet")
    with pytest.raises(SafeTagError, match="e.parquet: empty file"):
        load_parquet(tmp_path / "e.parquet")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(SafeTagError, match="e.jsonl: empty file"):
        load_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(SafeTagError, match=r"x.jsonl: row 0: missing key"):
        (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
        load_jsonl(tmp_path / "x.jsonl")
