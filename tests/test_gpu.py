"""GPU path (skipped without CUDA): bf16 autocast keeps log-probs fp32 and exact, the attention
backend (FlashAttention-2 if importable, else SDPA) decodes like generate, a GRPO step is finite."""
import pytest
import torch

from safegrpo.data.records import load_parquet
from safegrpo.rl.logprobs import token_logprobs
from safegrpo.model import default_attention, load_model, load_processor
from safegrpo.safety.prompting import encode_prompts
from safegrpo.rl.rollout import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_logprobs_under_autocast_match_fp32_naive():
    torch.manual_seed(0)
    h = torch.randn(512, 256, device="cuda", requires_grad=True)
    w = (torch.randn(151936, 256, device="cuda") * 0.02).requires_grad_()
    y = torch.randint(0, 151936, (512,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = token_logprobs(h, w, y)
    naive = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=1e-4)
    gh, gw = torch.autograd.grad(ours.sum(), (h, w))
    nh, nw = torch.autograd.grad(naive.sum(), (h, w))
    torch.testing.assert_close(gh, nh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, nw, atol=1e-4, rtol=1e-4)


def test_greedy_rollout_equals_generate_on_gpu(tiny_model_dir, synth_dir):
    model = load_model(tiny_model_dir, device="cuda").eval()
    assert model.config._attn_implementation == default_attention("cuda")
    proc = load_processor(tiny_model_dir)
    batch = {k: v.cuda() for k, v in encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=4),
                                                    "compact").items()}
    eos, pad = model.generation_config.eos_token_id, proc.tokenizer.pad_token_id
    ours = generate(model, batch, group_size=1, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad, temperature=0)
    ref = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ref = ref[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, ref[:, :ours.completion_ids.shape[1]])


def test_bf16_autocast_grpo_step_is_finite(tmp_path, tiny_model_dir, synth_dir):
    from test_trainer import tiny_cfg
    from safegrpo.config import load_config
    from safegrpo.trainer import Trainer
    cfg = load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"train.device": "cuda",
                                                                       "model.autocast": "bf16"}))
    tr = Trainer(cfg)
    tr.setup(tiny_model_dir)
    m = tr.train_step(0)
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "kl", "grad_norm", "entropy"))


def test_lean_decode_step_on_gpu(tiny_model_dir, synth_dir):
    """The lean decoder's CUDA path (fp32) against the Hugging Face step over the same caches."""
    from test_decode import _compare_steps
    model = load_model(tiny_model_dir, device="cuda").eval()
    proc = load_processor(tiny_model_dir)
    batch = {k: v.cuda() for k, v in encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=4),
                                                    "compact").items()}
    assert _compare_steps(model, batch, G=4) < 1e-4


def test_continuous_engine_on_gpu_matches_the_static_step(tiny_model_dir, synth_dir):
    """The continuous-batching engine (paged and dense) on CUDA: the tokens of the static Hugging
    Face step, greedy and sampled, with the budget respected."""
    model = load_model(tiny_model_dir, device="cuda").eval()
    proc = load_processor(tiny_model_dir)
    batch = {k: v.cuda() for k, v in encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=6),
                                                    "compact").items()}
    stops = [model.generation_config.eos_token_id] + list(range(200, 230))
    kw = dict(group_size=3, max_new_tokens=24, eos_token_id=stops, pad_token_id=proc.tokenizer.pad_token_id,
              seeds=[1, 2, 3, 4, 5, 6])
    Lp = batch["input_ids"].shape[1]
    for temperature in (0.0, 1.0):
        ref = generate(model, batch, lean=False, temperature=temperature, **kw)
        for budget in (Lp + 32, 3 * Lp + 96, 0):
            ro = generate(model, batch, max_batch_tokens=budget, temperature=temperature, **kw)
            assert torch.equal(ro.completion_ids, ref.completion_ids) and torch.equal(ro.lengths, ref.lengths)
            assert budget == 0 or ro.peak_cached_tokens <= budget
