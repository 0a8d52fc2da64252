"""Contrast pairs (data.contrast_column) and the partly aware warm start (sft.tags: partial):
what the learning demo of `make train` is built from."""
import random
from collections import Counter

import pytest

from safegrpo.config import DataConfig
from safegrpo.data.records import SafeTagRecord, load_parquet
from safegrpo.data.samplers import ContrastSampler, EpochSampler, make_sampler
from safegrpo.data.synth import (KINDS, all_concepts, caption_object, concept_class, demonstration,
                                 demonstration_tags, instruction_class, is_decoy, request_topic)


def _rec(key, tag, i):
    return SafeTagRecord(f"q{i}", [], "safe", "safe", tag, {"pair": key})


def test_every_drawn_row_of_a_set_is_followed_by_a_twin_of_the_other_tag():
    recs = [_rec("a", "unsafe", 0), _rec("a", "safe", 1), _rec("a", "safe", 2), _rec("", "safe", 3),
            _rec("b", "safe", 4), _rec("c", "unsafe", 5), _rec("c", "safe", 6)]     # b: one tag only
    s = ContrastSampler(EpochSampler(len(recs), 0), recs, "pair", 0)
    out = s.take(7) + s.take(6) + s.take(9)
    out += s.take(len(s.pending))            # a twin that did not fit opens the next draw
    i, pairs, base = 0, [], []
    while i < len(out):                      # walk the stream: a row with twins, then its twin
        r = recs[out[i]]
        base.append(out[i])
        if r.meta["pair"] in ("a", "c"):
            t = recs[out[i + 1]]
            assert t.meta["pair"] == r.meta["pair"] and t.combine_tag != r.combine_tag, (i, out)
            pairs.append((out[i], out[i + 1]))
            i += 2
        else:
            i += 1
    # the twins of row 0 come from shuffled passes over its set's safe rows, 1 and 2
    assert Counter(t for r, t in pairs if r == 0) in (Counter({1: 2, 2: 1}), Counter({1: 1, 2: 2}), Counter({1: 1, 2: 1}))
    assert base == EpochSampler(len(recs), 0).take(len(base))   # the base's draws, in its order


def test_a_contrast_sampler_resumes_where_it_stopped():
    recs = load_parquet_like()
    a = ContrastSampler(EpochSampler(len(recs), 3), recs, "pair", 3)
    a.take(5)
    st = a.state()
    want = a.take(11)
    b = ContrastSampler(EpochSampler(len(recs), 3), recs, "pair", 3)
    b.load(st)
    assert b.take(11) == want


def load_parquet_like():
    return [_rec("ab"[i % 2], ("safe", "unsafe")[i % 3 == 0], i) for i in range(12)]


def test_contrast_column_errors_name_the_column():
    recs = load_parquet_like()
    with pytest.raises(ValueError, match="data.contrast_column 'nope': the training data has no such column"):
        ContrastSampler(EpochSampler(12, 0), recs, "nope", 0)
    same = [_rec("a", "safe", i) for i in range(3)]
    with pytest.raises(ValueError, match="data.contrast_column 'pair': no row has a twin"):
        ContrastSampler(EpochSampler(3, 0), same, "pair", 0)


def test_synth_twins_are_a_compositional_row_and_its_decoys(synth_dir):
    """SafeTag-Synth's `contrast` column: a compositional row's twin is a decoy with the same
    instruction (a concept of another kind) and the other way round; with data.balance_combined
    the balance of the base draws is kept and every compositional draw brings its decoy."""
    train = load_parquet(synth_dir / "train.parquet")
    d = DataConfig(balance_combined=True, contrast_column="contrast")
    s = make_sampler(train, d, 0)
    out = s.take(400)
    for k in range(len(out) - 1):
        r, t = train[out[k]], train[out[k + 1]]
        if r.meta["group"] == "safe/safe/unsafe" and (k == 0 or train[out[k - 1]].meta["contrast"] == ""):
            assert is_decoy(t.meta["concept"], t.meta["instruction"]) and t.meta["instruction"] == r.meta["instruction"]
    groups = Counter(train[i].meta["group"] for i in out)
    decoys = sum(is_decoy(train[i].meta["concept"], train[i].meta["instruction"]) for i in out)
    assert decoys >= groups["safe/safe/unsafe"] * 0.9 and groups["safe/safe/unsafe"] > 0.1 * 400


def test_step_three_names_what_the_request_is_about(synth_dir):
    """The topic written in step 3 is the kind written in step 1 exactly when the pairing is
    compositional (among both-safe pairings), so step 4 compares two written facts."""
    train = load_parquet(synth_dir / "train.parquet")
    for r in train[:300]:
        c, i = r.meta["concept"], r.meta["instruction"]
        text = demonstration(r, random.Random(0), "gold", topic=True)
        assert "it is about" not in demonstration(r, random.Random(0), "gold")      # sft.step3=restate
        assert f"The image shows {caption_object(c)}." in text and f"it is about {request_topic(i)}." in text
        if (r.image_tag, r.text_tag) == ("safe", "safe"):
            assert (KINDS[c] == request_topic(i)) == (r.combine_tag == "unsafe")
    for c in all_concepts():                     # no kind is a topic outside its own class
        for cls in ("heights", "medicine", "chemicals", "vehicles"):
            assert (KINDS[c] == request_topic(next(i for i in {r.meta["instruction"] for r in train}
                                                   if instruction_class(i) == cls))) == (concept_class(c) == cls)


def test_partial_tags_carry_the_gold_combined_tag_on_a_share_of_compositional_demos(synth_dir):
    train = load_parquet(synth_dir / "train.parquet")
    rng = random.Random(0)
    for share in (0.0, 0.3, 1.0):
        draws = [(r, demonstration_tags(r, rng, "partial", share)) for r in train for _ in range(4)]
        comp = [t[2] for r, t in draws if r.meta["group"] == "safe/safe/unsafe"]
        assert abs(comp.count("unsafe") / len(comp) - share) < 0.04, (share, comp.count("unsafe") / len(comp))
        for r, t in draws:
            assert t[:2] == (r.image_tag, r.text_tag)
            if r.meta["group"] != "safe/safe/unsafe":        # elsewhere: per_modality, which is gold there
                assert t[2] == r.combine_tag
