"""The paper recipes in configs/ cannot rot: each loads, resolves against a tiny model of its own
family and a SafeTag-VL-3K-layout folder, and runs one GRPO step."""
import math
from pathlib import Path

import pytest
import torch

from safegrpo.config import load_config
from safegrpo.data.records import load_parquet, write_parquet
from safegrpo.data.tiny_model import build_tiny_model_dir
from safegrpo.trainer import Trainer

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"qwen3_vl_8b_safegrpo.yaml": "qwen3_vl", "qwen3_vl_4b_safegrpo.yaml": "qwen3_vl",
           "qwen2_5_vl_7b_safegrpo.yaml": "qwen2_5_vl", "qwen2_5_vl_3b_safegrpo.yaml": "qwen2_5_vl"}


@pytest.fixture(scope="module")
def safetag_vl(tmp_path_factory, synth_dir):
    """A folder in SafeTag-VL-3K's Hugging Face layout (data/{split}-00000-of-00001.parquet)."""
    root = tmp_path_factory.mktemp("SafeTag-VL-3K")
    for split, n in (("train", 16), ("test", 4)):
        write_parquet(load_parquet(synth_dir / f"{split}.parquet", limit=n), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {f: build_tiny_model_dir(tmp_path_factory.mktemp(f) / "model", TINY, seed=0, family=f)
            for f in set(RECIPES.values())}


def test_recipes_have_the_papers_settings():
    for name in RECIPES:
        cfg = load_config(ROOT / "configs" / name)
        assert (cfg.rollout.group_size, cfg.train.prompts_per_step, cfg.train.mini_batch_prompts) == (8, 256, 64)
        assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, "constant", 0.01, 1.0)
        assert (cfg.grpo.beta, cfg.grpo.kl_estimator, cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.dual_clip) \
            == (0.01, "k3", 0.2, 0.2, 3.0)
        assert (cfg.grpo.adv_scale, cfg.grpo.loss_agg, cfg.grpo.entropy_coef) == ("group", "token-mean", 0.0)
        assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == (1.0, 1.0, 4096)
        assert cfg.data.max_prompt_length == 2048 and cfg.data.prompt_style == "safegrpo"
        assert cfg.train.steps == math.ceil(15 * 3293 / 256)          # 15 epochs
        assert not cfg.model.trust_remote_code


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_one_step_on_a_tiny_model_of_its_family(recipe, tmp_path, family_dirs, safetag_vl):
    # every setting of the recipe is kept except where it runs, and the batch and length sizes
    # (256 prompts x 8 x 4,096 tokens is a GPU node's work): 4 prompts, 2 updates per step as in
    # the recipe's 256/64, 8 new tokens
    over = [f"model.path={family_dirs[RECIPES[recipe]]}", f"data.train={safetag_vl}", f"data.test={safetag_vl}",
            f"train.out_dir={tmp_path / 'run'}", "train.device=cpu", "train.prompts_per_step=4",
            "train.mini_batch_prompts=2", "train.micro_batch_prompts=1", "rollout.max_new_tokens=8"]
    cfg = load_config(ROOT / "configs" / recipe, over)
    assert cfg.model.autocast == "bf16" and cfg.model.gradient_checkpointing
    tr = Trainer(cfg)
    assert len(tr.train_records) == 16 and len(tr.test_records) == 4
    tr.setup(cfg.model.path)
    # a random model earns no reward and the reference equals the policy, so the first gradient
    # would be exactly zero: move the reference a little, so that the KL term pulls
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tr.policy.ref.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    before = [p.detach().clone() for p in tr.policy.model.parameters() if p.requires_grad]
    m = tr.train_step(0)
    after = [p for p in tr.policy.model.parameters() if p.requires_grad]
    assert all(math.isfinite(m[k]) for k in ("loss", "kl", "grad_norm", "reward/mean")) and m["kl"] > 0
    assert any(not (a == b).all() for a, b in zip(after, before))      # the optimizer stepped
