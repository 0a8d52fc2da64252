"""Safe loading: weights only from safetensors, no pickle anywhere, no remote code by default."""
import re
from pathlib import Path

import pytest
import torch

from safegrpo.config import Config
from safegrpo.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_pickled_weights_are_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"                                   # the same model, pickled weights only
    d.mkdir()
    for f in Path(tiny_model_dir).glob("*.json"):
        (d / f.name).write_text(f.read_text())
    torch.save(load_model(tiny_model_dir).state_dict(), d / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors|model.safetensors"):
        load_model(d)


def test_no_unsafe_torch_load_in_the_code():
    calls = []
    for f in [*ROOT.glob("safegrpo/**/*.py"), *ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]:
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            calls.append((f.name, "weights_only=True" in m.group(1)))
    assert all(ok for _, ok in calls), calls


def test_remote_code_is_off_unless_asked():
    assert Config().model.trust_remote_code is False
