"""bench/results.json: each benchmark merges its figures under its own key (atomic write)."""
import json
import os
from pathlib import Path

PATH = Path(__file__).with_name("results.json")


def record(key: str, figures: dict) -> None:
    data = json.loads(PATH.read_text()) if PATH.is_file() else {}
    data[key] = figures
    tmp = PATH.with_name(PATH.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, PATH)
