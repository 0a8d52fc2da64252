"""Options are documented where they are declared: every config key has a description, `train.py
--help` lists each one with its type and default, a key that moved names its new place, and a
checkpoint's config written before a move still loads."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from safegrpo.config import MOVED, Config, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def leaves(cls=Config, prefix=""):
    """(dotted key, field, type) of every option."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def test_every_option_is_described_and_listed_by_train_py_help():
    keys = list(leaves())
    assert len(keys) > 100
    assert [k for k, f, _ in keys if len(f.metadata.get("help", "")) < 8] == []
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")
              and "." in line.split()[0]]
    assert sorted(listed) == sorted(k for k, _, _ in keys) and len(set(listed)) == len(listed)   # each once
    assert "  grpo.beta  float = 0.01\n      KL coefficient (loss term); 0 skips the reference model" in out
    assert "  rollout.temperature  float = 1.0" in out and "  model.dtype  one of 'float32', 'bfloat16' = 'float32'" in out


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_a_moved_key_names_its_new_place(old, new):
    with pytest.raises(ValueError, match=f"config key {old} is now {new}"):
        load_config(None, [f"{old}=1"])


def test_a_checkpoint_config_from_before_the_move_loads_with_its_values():
    old = Config().to_dict()
    for section in ("reward", "anchor"):
        del old[section]
    old["model"].pop("freeze_vision_tower")
    old["grpo"].update({"refusal_judge": "strict", "tag_weight": 1.0, "behavior_weight": 0.0, "reward": "m:f",
                        "reward_timeout_s": 2.0, "reward_workers": 3, "ptx_coef": 0.5, "ptx_batch": 4,
                        "freeze_vision_tower": True})
    c = config_from_dict(old)
    assert (c.reward.refusal_judge, c.reward.tag_weight, c.reward.behavior_weight, c.reward.plugin,
            c.reward.timeout_s, c.reward.workers) == ("strict", 1.0, 0.0, "m:f", 2.0, 3)
    assert (c.anchor.coef, c.anchor.batch, c.model.freeze_vision_tower) == (0.5, 4, True)
    assert config_from_dict(Config().to_dict()) == Config()


@pytest.mark.parametrize("text,sets,message", [
    ("grpo:\n  beta: 0.5\ntrain:\n  steps: 2\ngrpo:\n  clip_low: 0.1\n", [],
     "cfg.yaml: line 5, column 1: not valid YAML (key 'grpo' given twice (first on line 1))"),
    ("grpo:\n  beta: 0.5\n  beta: 0.0\n", [], "cfg.yaml: line 3, column 3: not valid YAML (key 'beta' given twice"),
    ("grpo:\n\tbeta: 0.5\n", [], "cfg.yaml: line 2, column 1: not valid YAML (while scanning for the next token found "
                                 "character '\\t'"),
    ("grpo:\n  beta: 0.5\n", ["grpo.beta=[1"], "--set grpo.beta=[1: not valid YAML (while parsing a flow sequence"),
])
def test_yaml_mistakes_are_one_line_naming_the_file_or_the_set(tmp_path, text, sets, message):
    """A key given twice was silently the last one (grpo: twice lost beta: 0.5); a tab or an
    unclosed bracket gave a 30-line traceback naming <unicode string>."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(str(cfg), sets)
    assert message in str(e.value) and "\n" not in str(e.value)
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg),
                        *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_a_date_like_value_stays_text(tmp_path):
    cfg = load_config(None, ["train.out_dir=2026-12-03"])
    assert cfg.train.out_dir == "2026-12-03"
