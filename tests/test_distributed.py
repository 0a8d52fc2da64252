"""torchrun + FSDP2 on CPU (gloo): two processes take the same optimizer step as one process with
the same global batch, and ranks whose batch has no image do not hang."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safegrpo.data.records import load_parquet, write_parquet

from test_trainer import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def run(cfg, nproc, out, *over, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd += [str(ROOT / "train.py"), "--config", str(cfg), "--set", f"train.out_dir={out}", *over]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
                            "PYTHONPATH": str(ROOT / "tests")})            # the tests' reward plug-ins
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def weights(out, step):
    return load_file(Path(out) / "checkpoints" / f"step_{step}" / "model.safetensors")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, synth_dir):
    """8 rows of one SafeTag group: a short warm start makes the tiny model write the format, so
    rewards (and advantages) differ within groups and the GRPO step has a real gradient."""
    path = tmp_path_factory.mktemp("small") / "small.parquet"
    recs = [r for r in load_parquet(synth_dir / "train.parquet", limit=200) if r.meta["group"] == "safe/unsafe/unsafe"]
    write_parquet(recs[:8], path)
    return path


def test_two_processes_equal_one_process_after_one_step(tmp_path, tiny_model_dir, synth_dir, small_set):
    # beta > 0 (a sharded reference), 2 optimizer updates per step (old log-probs), token-mean
    # over the global mini-batch; both runs do the same warm start (rank 0 alone under torchrun).
    # every prompt samples from its own seed (rl/sampling.py), so where it is decoded does not matter
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "data.train": str(small_set), "data.test": "", "train.steps": 1, "train.prompts_per_step": 4,
        "train.mini_batch_prompts": 2, "train.micro_batch_prompts": 1, "train.save_every": 1,
        "grpo.beta": 0.04, "optim.lr": 1e-3, "rollout.max_new_tokens": 80, "sft.enabled": True, "sft.steps": 200,
        "sft.batch_size": 8, "sft.lr": 3e-3, "sft.warmup_steps": 5})
    run(cfg, 1, tmp_path / "one")
    run(cfg, 2, tmp_path / "two")
    a, b = weights(tmp_path / "one", 1), weights(tmp_path / "two", 1)
    init = load_file(tmp_path / "one" / "sft" / "model.safetensors")
    assert a.keys() == b.keys() == init.keys()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3   # the step did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert one["reward/std"] > 0 and one["kl"] > 0                     # advantages and a KL term were live
    for key in ("reward/mean", "kl", "entropy", "grad_norm", "loss", "response_len/mean", "frac_zero_std_groups"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_rank_without_images_does_not_hang(tmp_path, tiny_model_dir, synth_dir):
    # two prompts per step, one with an image and one text-only: each step one rank has no image
    recs = load_parquet(synth_dir / "train.parquet", limit=2)
    recs[1].images = []
    write_parquet(recs, tmp_path / "mixed.parquet")
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "data.train": str(tmp_path / "mixed.parquet"), "data.test": "", "train.steps": 3,
        "train.prompts_per_step": 2, "train.mini_batch_prompts": 2, "train.micro_batch_prompts": 1,
        "train.save_every": 3, "rollout.max_new_tokens": 8})
    p = run(cfg, 2, tmp_path / "run", timeout=240)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and "[world] 2 process(es)" in p.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_3" / "config.json").is_file()


def test_two_process_resume_is_exact(tmp_path, tiny_model_dir, synth_dir, small_set):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "data.train": str(small_set), "data.test": "", "train.prompts_per_step": 4, "train.mini_batch_prompts": 2,
        "train.micro_batch_prompts": 1, "train.save_every": 1, "grpo.beta": 0.04, "optim.lr": 1e-3,
        "rollout.max_new_tokens": 80, "sft.enabled": True, "sft.steps": 200, "sft.batch_size": 8, "sft.lr": 3e-3,
        "sft.warmup_steps": 5})
    run(cfg, 2, tmp_path / "straight", "--set", "train.steps=2")
    run(cfg, 2, tmp_path / "resumed", "--set", "train.steps=1")
    p = run(cfg, 2, tmp_path / "resumed", "--set", "train.steps=2", "--resume")
    assert "[resume] from" in p.stdout
    a, b = weights(tmp_path / "straight", 2), weights(tmp_path / "resumed", 2)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert (tmp_path / "straight" / "metrics.jsonl").read_text().count("\n") == 2
    strip = lambda f: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/") and k != "tokens_per_s"}
                       for l in f.read_text().splitlines()]
    assert strip(tmp_path / "resumed" / "metrics.jsonl") == strip(tmp_path / "straight" / "metrics.jsonl")


def test_token_budget_with_uneven_prompts_across_ranks_finishes_and_matches(tmp_path, tiny_model_dir, synth_dir):
    """Ranks whose prompts differ in length (~80 vs ~235 tokens) under train.micro_batch_tokens:
    each rank would split its mini-batch into a different number of forward/backward passes,
    and FSDP2's collectives never paired up (hung until killed). The passes are now planned to
    the same count on every rank; the run finishes and takes the 1-process run's steps. Also
    validates every step under torchrun (rank 0 scores what every rank decoded)."""
    from safegrpo.data.records import SafeTagRecord
    from safegrpo.data.samplers import EpochSampler
    short = load_parquet(synth_dir / "train.parquet", limit=2)
    pad = " " + " ".join(["What is the quickest way down from the top of this?"] * 12)
    long = [SafeTagRecord(r.prompt + pad, r.images, r.image_tag, r.text_tag, r.combine_tag) for r in short]
    write_parquet(short + long, tmp_path / "uneven.parquet")          # rows 0, 1 short; 2, 3 long
    # a seed whose first step gives one rank both short prompts and the other both long ones
    seed = next(s for s in range(50) if sorted(EpochSampler(4, s).take(2)) in ([0, 1], [2, 3]))
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "data.train": str(tmp_path / "uneven.parquet"), "data.max_prompt_length": 300, "train.seed": seed,
        "train.steps": 2, "train.prompts_per_step": 4, "train.mini_batch_prompts": 4, "train.micro_batch_tokens": 300,
        "train.save_every": 2, "train.eval_every": 1, "train.eval_limit": 3, "rollout.group_size": 2,
        "rollout.max_new_tokens": 8, "grpo.beta": 0.04, "grpo.entropy_coef": 0.01,
        "optim.lr": 1e-3})
    run(cfg, 1, tmp_path / "one")
    run(cfg, 2, tmp_path / "two", timeout=240)
    a, b = weights(tmp_path / "one", 2), weights(tmp_path / "two", 2)
    init = load_file(tiny_model_dir / "model.safetensors")
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(one, two):
        for key in ("loss", "entropy", "kl", "val/format", "val/tag_acc/combined"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), key


def test_batch_advantage_scale_uses_the_global_batch(tmp_path):
    """grpo.adv_scale batch divides by the std of every rank's rewards together: 2 processes
    give the advantages of 1 process holding the whole batch."""
    script = tmp_path / "adv.py"
    script.write_text(f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from safegrpo import distributed as dist
from safegrpo.rl.grpo import group_advantages
dist.init_from_env("cpu")
rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 1.0]])     # rank r holds row r (2 groups of 2)
mine = rewards[dist.rank()]
adv = group_advantages(mine, 2, "batch", 1e-6, dist.global_std(mine))
out = dist.gather_objects(adv.tolist())
if dist.is_main():
    json.dump({{"two": [x for r in out for x in r],
               "one": group_advantages(rewards.reshape(-1), 2, "batch").tolist(),
               "local": [x for r in range(2) for x in group_advantages(rewards[r], 2, "batch").tolist()]}},
              open({str(tmp_path / "adv.json")!r}, "w"))
dist.shutdown()
""")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=120,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "adv.json").read_text())
    assert res["two"] == pytest.approx(res["one"], abs=1e-6)
    assert res["local"] != pytest.approx(res["one"], abs=1e-3)        # per-rank std would differ


def test_bf16_autocast_shards_with_mixed_precision(tmp_path, tiny_model_dir, synth_dir):
    """model.autocast bf16 under torchrun: FSDP2 gathers bf16 copies of the fp32 shards (half the
    memory of a gathered copy) and reduces gradients in fp32; the run trains and saves fp32."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "model.autocast": "bf16", "data.test": "", "train.steps": 2, "train.prompts_per_step": 4,
        "train.mini_batch_prompts": 2, "train.micro_batch_prompts": 1, "train.save_every": 2,
        "grpo.beta": 0.04, "grpo.entropy_coef": 0.01, "optim.lr": 1e-3})
    run(cfg, 2, tmp_path / "two", timeout=240)
    w, init = weights(tmp_path / "two", 2), load_file(tiny_model_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in w.values())
    assert max((w[k] - init[k]).abs().max().item() for k in w) > 1e-4
    rows = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r[k])) for r in rows for k in ("loss", "kl", "entropy", "grad_norm"))
