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
