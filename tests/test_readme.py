"""The README and docs/ say only what a machine can check is there: every `make` target they name
exists, every option key they name is declared (docs/OPTIONS.md is the declarations' text), and
every file path they name exists or is one the commands create."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from safegrpo.config import MOVED, Config, options_doc

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("model", "data", "rollout", "grpo", "reward", "anchor", "optim", "sft", "train")
# made by the commands (make train / eval / bench, a run), not shipped
CREATED = ("runs/", "data/synth", "data/tiny_model", "data/text_safety", ".venv", "bench/results.json",
           "checkpoints/", "sft/", "eval/", "cache", "out_dir/", "trainer/")
# paths inside someone else's folder, named to say what it holds
ELSEWHERE = {"data/images/SafeBench/", "data/question/safebench.csv",     # inside FigStep's own folder
             "data/prompt.txt"}                                            # an example of the user's own file


def code_reference(name: str) -> bool:
    """`grpo.grpo_loss`, `model.disable_dropout`: a module of the package and a name it defines;
    `model.generate`: a method of a Hugging Face model."""
    from transformers import GenerationMixin
    mod, _, attr = name.partition(".")
    if mod == "model" and hasattr(GenerationMixin, attr):
        return True
    return any(re.search(rf"^(def|class) {re.escape(attr.split('.')[0])}\b|^{re.escape(attr)} =", f.read_text(), re.M)
               for f in (ROOT / "safegrpo").rglob(f"{mod}.py"))


def declared(cls=Config, prefix=""):
    """Every option key and section name of the declarations."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from declared(hints[f.name], f"{prefix}{f.name}.")


def test_options_doc_is_the_declarations():
    assert (ROOT / "docs" / "OPTIONS.md").read_text() == options_doc(), "run `make options-doc`"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_make_target_named_exists(doc):
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    text = doc.read_text()
    named = set(re.findall(r"`make ([a-z][a-z-]*)", text)) | set(re.findall(r"^\s*make ([a-z][a-z-]*)", text, re.M))
    assert named and named <= targets or not named, f"{doc.name} names make targets that do not exist: " \
                                                    f"{sorted(named - targets)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_option_key_named_is_declared(doc):
    keys = set(declared())
    text = doc.read_text()
    named = set(re.findall(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_]+(?:\.[a-z_]+)*)(?![\w/(-])", text))
    named = {n.rstrip(".") for n in named if not n.endswith((".py", ".md", ".yaml", ".json", ".parquet"))}
    unknown = sorted(n for n in named if n not in keys and n not in MOVED and not code_reference(n))
    assert not unknown, f"{doc.name} names option keys that are not declared: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_path_named_exists(doc):
    text = doc.read_text()
    paths = set(re.findall(r"`((?:\.\./)?[A-Za-z_.][\w.-]*(?:/[\w.-]+)+/?)`", text))
    paths |= set(re.findall(r"\[[^\]]*\]\(((?!https?:)[^)#\s]+)\)", text))          # Markdown links
    missing = []
    for p in sorted(paths):
        if p.startswith(CREATED) or p in ELSEWHERE or any(c in p for c in "<>*{}$") or "step_N" in p or "..." in p:
            continue
        if not (p.endswith("/") or "." in p.rsplit("/", 1)[-1]):       # a metric name (reward/errors), not a path
            continue
        base = ROOT if not p.startswith("../") else ROOT
        here = (doc.parent / p) if doc.parent != ROOT and not (ROOT / p).exists() else base / p
        if not (here.exists() or (ROOT / p).exists() or (ROOT / "safegrpo" / p).exists()):
            missing.append(p)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
