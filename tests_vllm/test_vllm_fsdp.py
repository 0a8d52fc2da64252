"""rollout.engine: vllm under torchrun: 2 gloo ranks, the policy sharded by FSDP2, each rank driving
its own vLLM engine (vLLM's external launcher, the torchrun world as its own). After a sync, what
each rank's engine received equals the unsharded policy parameter by parameter, and each engine's
greedy completions equal our engine's on the unsharded policy. The run it uses: conftest.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
from safegrpo import distributed as dist
from safegrpo.config import load_config
from safegrpo.data.records import load_parquet
from safegrpo.model import load_model, load_processor
from safegrpo.rl import vllm_engine
from safegrpo.rl.rollout import banned_token_ids, generate
from safegrpo.safety.prompting import encode_prompts


def main():
    ckpt, start, test, out = sys.argv[1:5]
    dist.init_from_env("cpu")
    rank = dist.rank()
    model = load_model(ckpt)                                   # the policy: sharded below
    plain = load_model(ckpt).eval()                            # the same, whole: the reference
    dist.shard(dist.Forward(model, lambda m: None))
    assert all(hasattr(p, "full_tensor") for p in model.parameters())     # every parameter a DTensor shard
    cfg = load_config(None, ["rollout.engine=vllm", "data.max_prompt_length=256", "rollout.max_new_tokens=96"])
    engine = vllm_engine.VLLMEngine(cfg, start, seed=rank, banned_ids=banned_token_ids(plain),
                                    eos_token_id=plain.generation_config.eos_token_id,
                                    image_token_id=plain.config.image_token_id, launched=True)
    sent, orig = {}, vllm_engine.policy_weights

    def spy(m):
        for name, t in orig(m):
            sent[name] = t.detach().clone()
            yield name, t
    vllm_engine.policy_weights = spy
    engine.sync(model)                                         # both ranks: the gathers are collectives
    want = dict(plain.named_parameters())
    diff = max(float((sent[n] - want[n].detach()).abs().max()) for n in want)
    proc = load_processor(ckpt)
    recs = load_parquet(test, limit=16)[rank * 8:(rank + 1) * 8]            # each rank its own prompts
    batch = encode_prompts(proc, recs, "compact")
    ours = generate(plain, batch, group_size=1, max_new_tokens=96, eos_token_id=plain.generation_config.eos_token_id,
                    pad_token_id=proc.tokenizer.pad_token_id, temperature=0.0, seeds=[0] * len(recs))
    theirs = engine.generate(batch, [r.images for r in recs], group_size=1, max_new_tokens=96,
                             pad_token_id=proc.tokenizer.pad_token_id, temperature=0.0, top_p=1.0)
    res = {"rank": rank, "world": dist.world_size(), "names": sorted(sent) == sorted(want), "max_diff": diff,
           "greedy_equal": bool(torch.equal(ours.completion_ids, theirs.completion_ids)),
           "distinct": len(set(map(tuple, ours.completion_ids.tolist())))}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.shutdown(engine.close)


if __name__ == "__main__":
    main()
"""


def test_fsdp2_ranks_each_sync_their_engine_with_the_whole_policy(run, tmp_path):
    script = tmp_path / "fsdp_vllm.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(run / "checkpoints" / "step_3"), str(run / "sft"),
                        str(run.parent / "synth" / "test.parquet"), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["world"] == 2 and res["names"], res
        assert res["max_diff"] == 0.0, res                     # the gathered shards are the parameters, bit for bit
        assert res["greedy_equal"] and res["distinct"] > 2, res
