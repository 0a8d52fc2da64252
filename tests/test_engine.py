"""The continuous-batching rollout engine: the same completions, token for token, whatever the KV
budget (one prompt at a time up to everything at once), against the static Hugging Face step;
never more cached tokens than the budget; a finished row costs no further compute."""
import pytest
import torch

from safegrpo.data.records import load_parquet
from safegrpo.model import load_model, load_processor
from safegrpo.rl.rollout import PAGE, generate, kv_plan
from safegrpo.safety.prompting import encode_prompts

G, T = 3, 24


@pytest.fixture(scope="module")
def skewed(tiny_model_dir, synth_dir):
    """The tiny model with 30 of its 2,048 token ids made stop tokens besides EOS: near-uniform
    logits then stop a row with p ~ 0.05 per step (these ids a little more often), so completion lengths spread from a few tokens
    to the maximum (a thinking model's skew, in miniature)."""
    model, proc = load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=6), "compact")
    stops = [model.generation_config.eos_token_id] + list(range(200, 230))
    return model, proc, batch, stops


def run(model, proc, batch, stops, budget, lean=True, **kw):
    return generate(model, batch, group_size=G, max_new_tokens=T, eos_token_id=stops,
                    pad_token_id=proc.tokenizer.pad_token_id, seeds=[11, 12, 13, 14, 15, 16], lean=lean,
                    max_batch_tokens=budget, **kw)


def test_lengths_are_skewed(skewed):
    ro = run(*skewed, 0)
    print(sorted(ro.lengths.tolist()))
    assert ro.lengths.min() < T // 3 and (ro.lengths == T).any() and len(set(ro.lengths.tolist())) >= 6


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_every_budget_gives_the_same_completions_within_budget(skewed, temperature):
    model, proc, batch, stops = skewed
    reference = run(model, proc, batch, stops, 0, lean=False, temperature=temperature)     # static, Hugging Face step
    Lp = batch["input_ids"].shape[1]
    one_row = Lp + -(-T // PAGE) * PAGE   # one prompt slot and one row's pages: a single row at a time
    redone = {}
    for budget in (one_row, 2 * Lp + G * T, 3 * Lp + 4 * T, 4 * Lp + 2 * G * T, 0):
        ro = run(model, proc, batch, stops, budget, temperature=temperature)
        assert torch.equal(ro.lengths, reference.lengths), budget
        assert torch.equal(ro.completion_ids, reference.completion_ids), budget
        if budget:
            P, pages, page = kv_plan(budget, Lp, G, T, 6)
            assert ro.peak_cached_tokens <= P * Lp + pages * page <= budget, (budget, ro.peak_cached_tokens)
        assert ro.row_steps - ro.redone_steps == int((ro.lengths - 1).sum())   # no row computed after it stopped
        redone[budget] = ro.redone_steps
    assert reference.row_steps > ro.row_steps                        # the static batch computes finished rows
    assert redone[one_row] > 0 and redone[0] == 0                    # a tight budget pre-empts, and still agrees


def test_the_budget_is_honoured_and_too_small_a_budget_is_an_error(skewed):
    model, proc, batch, stops = skewed
    Lp = batch["input_ids"].shape[1]
    per_row = -(-T // PAGE)                                          # pages of one row at full length
    assert kv_plan(0, Lp, G, T, 6) == (6, 6 * G, T)                     # no bound: a page of T per row (dense)
    assert kv_plan(6 * Lp + 6 * G * T, Lp, G, T, 6) == (6, 6 * G, T)    # everything fits: dense too
    assert kv_plan(Lp + per_row * PAGE, Lp, G, T, 6) == (1, per_row, PAGE)   # the smallest budget: one prompt, one row
    budget = 6 * Lp + 6 * G * T - 1                                      # one token short of everything: pages
    P, pages, page = kv_plan(budget, Lp, G, T, 6)
    assert page == PAGE and P == min(6, budget // (4 * Lp)) and pages == (budget - P * Lp) // PAGE
    with pytest.raises(ValueError, match="rollout.max_batch_tokens=50 holds no prompt"):
        run(model, proc, batch, stops, 50)
    with pytest.raises(ValueError, match="rollout.max_batch_tokens=50 holds no prompt on the Hugging Face step"):
        run(model, proc, batch, stops, 50, lean=False)
