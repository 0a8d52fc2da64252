"""DAPO dynamic sampling (grpo.filter_zero_std, grpo.oversample): groups without reward spread
leave the update, which then equals the update on the informative groups alone; oversampling
refills; under torchrun two processes finish and match one."""
import torch

from safegrpo.config import load_config
from safegrpo.trainer import Trainer

from test_distributed import run as run_dist, weights
from test_trainer import rows, tiny_cfg

PLUGIN = {"reward.plugin": "plugin_rewards:half_constant", "grpo.beta": 0.1, "grpo.entropy_coef": 0.01,
          "train.prompts_per_step": 8, "train.mini_batch_prompts": 4, "train.micro_batch_prompts": 2,
          "train.steps": 1, "optim.lr": 1e-2, "data.test": ""}


def _trained(tr, spy=None):
    tr.setup(tr.model_dir)
    if spy is not None:                  # spy(collect) wraps the collector's collect
        tr.collector.collect = spy(tr.collector.collect)
    m = tr.train_step(0)
    return m, {k: v.detach().clone() for k, v in tr.policy.model.state_dict().items()}


def test_dropped_groups_leave_no_trace_in_the_update(tmp_path, tiny_model_dir, synth_dir):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = Trainer(load_config(tiny_cfg(tmp_path / "a", tiny_model_dir, synth_dir,
                                     **{**PLUGIN, "grpo.filter_zero_std": True})))
    seen = {}

    def spy(real):
        def collect(step):
            grp, dapo = real(step)
            seen["grp"] = grp
            return grp, dapo
        return collect
    m, filtered = _trained(a, spy)
    grp = seen["grp"]
    keep = grp.with_spread()
    assert 0 < len(keep) < grp.n                               # some groups dropped, some kept
    assert all(grp.recs[i].tags["combine_tag"] != "safe" for i in keep)
    assert m["dapo/kept"] == len(keep) and m["dapo/dropped"] == grp.n - len(keep) and m["dapo/refilled"] == 0

    # the informative groups alone, sampled anew at their own positions (so the same seeds)
    b = Trainer(load_config(tiny_cfg(tmp_path / "b", tiny_model_dir, synth_dir, **PLUGIN)))
    recs = [a.train_records.index(grp.recs[i]) for i in keep]
    only = lambda real: lambda step: (b.collector.groups(step, [grp.positions[i] for i in keep], recs), {})  # noqa: E731
    _, alone = _trained(b, only)
    moved = max((filtered[k] - alone[k]).abs().max().item() for k in filtered)
    assert moved < 1e-6
    # and it differs from the unfiltered update (the dropped groups would count in the token mean)
    (tmp_path / "c").mkdir()
    c = Trainer(load_config(tiny_cfg(tmp_path / "c", tiny_model_dir, synth_dir, **PLUGIN)))
    _, unfiltered = _trained(c)
    assert max((filtered[k] - unfiltered[k]).abs().max().item() for k in filtered) > 1e-5


def test_oversampling_refills_the_step(tmp_path, tiny_model_dir, synth_dir):
    cfg = load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        **PLUGIN, "train.steps": 3, "grpo.filter_zero_std": True, "grpo.oversample": 2.0}))
    Trainer(cfg).fit()
    for r in rows(tmp_path / "run"):
        assert r["dapo/refilled"] > 0
        assert r["dapo/kept"] >= 8 or r["dapo/refilled"] == 16          # full, or the cap was reached
        assert r["dapo/kept"] + r["dapo/dropped"] == 8 + r["dapo/refilled"]


def test_filtering_under_two_processes_matches_one(tmp_path, tiny_model_dir, synth_dir):
    """Ranks keep different numbers of groups (one may keep none of a mini-batch): they still
    run the same passes (zero-weight ones where they have none), finish, and match one process."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{**PLUGIN, "grpo.filter_zero_std": True,
                                                           "train.save_every": 1, "optim.lr": 1e-3})
    run_dist(cfg, 1, tmp_path / "one", timeout=300)
    p = run_dist(cfg, 2, tmp_path / "two", timeout=300)
    assert "[world] 2 process(es)" in p.stdout
    one, two = weights(tmp_path / "one", 1), weights(tmp_path / "two", 1)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
    assert rows(tmp_path / "one")[0]["dapo/kept"] == rows(tmp_path / "two")[0]["dapo/kept"]


def test_a_rank_left_without_groups_for_the_whole_step_finishes_and_matches_one(tmp_path, tiny_model_dir, synth_dir):
    """DAPO drops every group of rank 1 in the step (its records are combined-safe: the plug-in
    scores them 0) and keeps rank 0's: rank 1 must still join the reference and old-policy
    passes' gathers (FSDP collectives) instead of returning early, which hung the job."""
    from safegrpo.data.records import load_parquet, write_parquet
    from safegrpo.data.samplers import EpochSampler
    recs = load_parquet(synth_dir / "train.parquet", limit=200)
    safe = [r for r in recs if r.combine_tag == "safe"][:2]
    unsafe = [r for r in recs if r.combine_tag == "unsafe"][:2]
    # 4 prompts per step, mini-batches of 2 over 2 ranks: rank 0 owns draw positions 0 and 2, rank 1 owns 1 and 3
    draw = EpochSampler(4, 0).take(4)
    table = [None] * 4
    for pos, r in zip(range(4), [unsafe[0], safe[0], unsafe[1], safe[1]]):
        table[draw[pos]] = r
    write_parquet(table, tmp_path / "four.parquet")
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        **PLUGIN, "data.train": str(tmp_path / "four.parquet"), "grpo.filter_zero_std": True,
        "train.prompts_per_step": 4, "train.mini_batch_prompts": 2, "train.micro_batch_prompts": 1,
        "train.save_every": 1, "optim.lr": 1e-3})
    run_dist(cfg, 1, tmp_path / "one", timeout=300)
    p = run_dist(cfg, 2, tmp_path / "two", timeout=180)
    assert "[world] 2 process(es)" in p.stdout
    assert rows(tmp_path / "one")[0]["dapo/kept"] == 2 == rows(tmp_path / "two")[0]["dapo/kept"]
    one, two = weights(tmp_path / "one", 1), weights(tmp_path / "two", 1)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
    # with a rollout correction on, the rank without groups still joins its collectives
    fixed = run_dist(cfg, 2, tmp_path / "corrected", "--set", "grpo.rollout_correction.rollout_is=token",
                     "--set", "grpo.rollout_correction.rollout_rs=token", timeout=180)
    assert "[world] 2 process(es)" in fixed.stdout and rows(tmp_path / "corrected")[0]["dapo/kept"] == 2


def test_empty_steps_move_no_schedule_and_their_count_survives_resume(tmp_path, tiny_model_dir, synth_dir, capsys):
    """A step whose DAPO filter keeps no group applies no update, so the warm-up schedule stays
    where it was (it advanced on the skipped optimizer step: 1.1e-4 -> 3.4e-4 over three such
    steps); the count of empty steps in a row is checkpointed, so --resume stops at
    grpo.max_empty_steps counting the steps before the checkpoint too."""
    import pytest
    from safegrpo.optim import NothingToLearnError
    over = {**PLUGIN, "reward.plugin": "plugin_rewards:constant", "grpo.filter_zero_std": True,
            "optim.warmup_steps": 8, "grpo.max_empty_steps": 3, "train.steps": 2, "train.save_every": 1}
    Trainer(load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **over))).fit()
    lrs = [r["lr"] for r in rows(tmp_path / "run")]
    assert lrs[0] == lrs[1] == 1e-2 / 16 and all(r["dapo/kept"] == 0 for r in rows(tmp_path / "run"))
    capsys.readouterr()
    tr = Trainer(load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{**over, "train.steps": 5}), []),
                 resume=True)
    with pytest.raises(NothingToLearnError, match="for 3 steps in a row .up to step 3."):
        tr.fit()
