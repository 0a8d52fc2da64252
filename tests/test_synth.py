"""SafeTag-Synth: determinism, the five groups, held-out pairings, and that both modalities are needed."""
import random
from collections import Counter

from safegrpo.data.records import load_parquet
from safegrpo.safety.reward import reward_breakdown
from safegrpo.data.synth import (GROUP_SHARES, caption_object, badge_colours, SynthConfig, all_concepts, all_instructions, demonstration, generate,
                            pair_tags, single_modality_accuracy)


def test_deterministic_and_written(synth_dir):
    a = generate(SynthConfig(seed=3, n_train=50, n_test=20))
    b = generate(SynthConfig(seed=3, n_train=50, n_test=20))
    assert [(r.prompt, r.meta, r.images[0].tobytes()) for r in a["train"]] == \
           [(r.prompt, r.meta, r.images[0].tobytes()) for r in b["train"]]
    c = generate(SynthConfig(seed=4, n_train=50, n_test=20))
    assert [r.meta["concept"] for r in a["train"]] != [r.meta["concept"] for r in c["train"]]
    train = load_parquet(synth_dir / "train.parquet")
    assert len(train) == 3000 and len(load_parquet(synth_dir / "test.parquet")) == 400


def test_five_groups_in_paper_proportions(synth_dir):
    for split, n in (("train", 3000), ("test", 400)):
        recs = load_parquet(synth_dir / f"{split}.parquet")
        groups = Counter((r.image_tag, r.text_tag, r.combine_tag) for r in recs)
        assert set(groups) == set(GROUP_SHARES)
        for g, share in GROUP_SHARES.items():
            assert abs(groups[g] / n - share) < 0.02, (g, groups[g])
        assert abs(groups[("safe", "safe", "unsafe")] / n - 0.10) < 0.02   # compositional about 10%
        for r in recs:
            assert pair_tags(r.meta["concept"], r.meta["instruction"]) == (r.image_tag, r.text_tag, r.combine_tag)
            assert r.meta["concept"] not in r.prompt.lower()                  # the concept is only in the pixels


def test_test_split_holds_out_pairings(synth_dir):
    train, test = (load_parquet(synth_dir / f"{s}.parquet") for s in ("train", "test"))
    pairs = lambda recs: {(r.meta["concept"], r.meta["instruction"]) for r in recs}
    assert not pairs(train) & pairs(test)
    concepts, instructions = {c for c, _ in pairs(train)}, {i for _, i in pairs(train)}
    assert all(c in concepts and i in instructions for c, i in pairs(test))


def test_compositional_group_needs_both_modalities(synth_dir):
    train, test = (load_parquet(synth_dir / f"{s}.parquet") for s in ("train", "test"))
    for recs in (train, test):
        comp = [r for r in recs if r.meta["group"] == "safe/safe/unsafe"]
        safe_pairs = [r for r in recs if r.combine_tag == "safe"]
        safe_instr = {r.prompt for r in safe_pairs}
        safe_concepts = {r.meta["concept"] for r in safe_pairs}
        assert comp
        assert all(r.prompt in safe_instr for r in comp)                      # text alone can't tell
        assert all(r.meta["concept"] in safe_concepts for r in comp)          # image alone can't tell
    # neither modality alone predicts the combined tag on the test split above 80%
    assert single_modality_accuracy(train, test, "instruction") <= 0.80
    assert single_modality_accuracy(train, test, "concept") <= 0.80


def test_demonstrations_follow_format_with_uninformative_tags(synth_dir):
    train = load_parquet(synth_dir / "train.parquet")
    parts = [reward_breakdown(r.meta["demo"], r.tags) for r in train]
    assert all(p["format"] == 1.0 for p in parts)
    for tag, gold in (("visual_safe", "image_tag"), ("text_safe", "text_tag"), ("combined_safe", "combine_tag")):
        acc = sum(p["pred"][tag] == getattr(r, gold) for p, r in zip(parts, train)) / len(train)
        assert 0.4 < acc < 0.6, (tag, acc)                                   # random, not informative
    for p, r in zip(parts, train):
        assert f"shows {caption_object(r.meta['concept'])}." in r.meta["demo"]   # the caption is right
        if p["pred"]["combined_safe"] == r.combine_tag:
            assert p["behavior"] == 1.0                                      # answer follows the written tag
    demo = demonstration(train[0], random.Random(0))
    assert demo.startswith("<think>") and demo.endswith("</answer>")


def test_world_size():
    assert len(all_concepts()) == 40 and len(all_instructions()) == 24


def test_image_styles_render_the_concept_only_in_pixels():
    import random as _r
    from safegrpo.data.synth import render_badge, render_word, available_fonts
    pairs = badge_colours()
    assert len(set(pairs.values())) == 40                                      # one colour pair per concept
    a = render_badge("bridge", _r.Random(0))
    assert a.size == (56, 56)
    w = generate(SynthConfig(seed=0, n_train=30, n_test=10, image_style="word"))
    assert w["train"][0].images[0].size == (112, 56)
    assert render_word("bomb", _r.Random(1), available_fonts()).getbbox() is not None


def test_demonstration_tag_modes_write_what_they_promise(synth_dir):
    """sft.tags: random is an even coin on every tag; per_modality writes the right visual and
    text tags and combined = unsafe if either is (wrong on exactly the compositional group);
    per_modality_coin the same but a coin where both sides are safe; gold the gold tags."""
    from safegrpo.data.synth import demonstration_tags
    train = load_parquet(synth_dir / "train.parquet")
    rng = random.Random(0)
    draws = {m: [(r, demonstration_tags(r, rng, m)) for r in train] for m in ("random", "per_modality", "per_modality_coin", "gold")}
    gold = lambda r: (r.image_tag, r.text_tag, r.combine_tag)
    acc = lambda m, k: sum(t[k] == gold(r)[k] for r, t in draws[m]) / len(train)
    assert all(0.45 < acc("random", k) < 0.55 for k in range(3))
    assert all(t == gold(r) for r, t in draws["gold"])
    for mode in ("per_modality", "per_modality_coin"):
        assert acc(mode, 0) == acc(mode, 1) == 1.0
        for r, t in draws[mode]:
            if "unsafe" in t[:2]:
                assert t[2] == "unsafe"
    compositional = [t for r, t in draws["per_modality"] if gold(r) == ("safe", "safe", "unsafe")]
    assert compositional and all(t[2] == "safe" for t in compositional)
    assert all(t[2] == r.combine_tag for r, t in draws["per_modality"] if gold(r) != ("safe", "safe", "unsafe"))
    both_safe = [t[2] for r, t in draws["per_modality_coin"] if gold(r)[:2] == ("safe", "safe")]
    assert 0.45 < both_safe.count("unsafe") / len(both_safe) < 0.55


def test_step4_compare_states_the_kind_match_rightly_and_only_when_asked(synth_dir):
    """sft.step4=compare: step 4 says 'The image is what the request is about.' exactly for the
    pairings whose image kind is the request's topic (among both-safe pairings: the compositional
    ones), 'not' for every other pairing, whatever the tags drawn; without it step 4 is the tag alone."""
    from safegrpo.data.synth import CLASS_KINDS, KINDS, instruction_class, is_decoy
    train = load_parquet(synth_dir / "train.parquet")
    rng = random.Random(0)
    seen = set()
    for r in train:
        c, i = r.meta["concept"], r.meta["instruction"]
        demo = demonstration(r, rng, "partial", 0.3, topic=True, compare=True)
        step4 = demo.split("4. ")[1].split("<combined_safe>")[0]
        same = instruction_class(i) is not None and KINDS[c] == CLASS_KINDS[instruction_class(i)]  # naive reference
        assert step4 == ("The image is what the request is about. " if same else
                         "The image is not what the request is about. "), (c, i)
        if r.meta["group"] == "safe/safe/safe" or r.meta["group"] == "safe/safe/unsafe":
            assert same == (r.combine_tag == "unsafe")            # among both-safe: exactly compositional
        seen.add((same, is_decoy(c, i)))
        assert demonstration(r, random.Random(1), "partial", 0.3, topic=True).split("4. ")[1].startswith("<combined_safe>")
    assert seen == {(True, False), (False, True), (False, False)}
