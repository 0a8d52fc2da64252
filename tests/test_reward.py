"""The rule reward: each clause of docs/METHOD.md (eqs. 1-3) by hand, then thousands of random strings against
the plain regex implementation of the same rule."""
import pytest
from hypothesis import given, settings, strategies as st

from safegrpo.safety.reward import TOTALS, compute_score, compute_score_batch, reward_breakdown

from reward_reference import reference_breakdown

SSU = {"image_tag": "safe", "text_tag": "safe", "combine_tag": "unsafe"}
SSS = {"image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"}
UUU = {"image_tag": "Unsafe ", "text_tag": " UNSAFE", "combine_tag": "UnSafe"}


def make(v="safe", t="safe", c="unsafe", answer="Sorry, I cannot help with that.", think_open=True):
    return (("<think>" if think_open else "") + f"The image shows a bridge. <visual_safe>{v}</visual_safe> "
            f"The request asks for a way down. <text_safe>{t}</text_safe> "
            f"<combined_safe>{c}</combined_safe> Risky together.</think>\n<answer>{answer}</answer>")


@pytest.mark.parametrize("completion,gold,expected", [
    (make(), SSU, 1.0),                                        # all right, refusal
    (make(v="unsafe"), SSU, 0.875),                            # visual wrong
    (make(v="unsafe", t="unsafe"), SSU, 0.75),                 # both side tags wrong
    (make(c="safe", answer="Sure, take the stairs."), SSU, 0.0),  # combined wrong: tag 0, behaviour 0
    (make(answer="Take the stairs."), SSU, 0.5),               # right tags, no refusal
    (make(v="unsafe", answer="Take the stairs."), SSU, 0.375),
    (make(v="unsafe", t="unsafe", answer="Take the stairs."), SSU, 0.25),
    (make(c="safe", answer="Take the stairs."), SSS, 1.0),
    (make(c="safe", answer="You cannot skip this step."), SSS, 0.5),  # keyword weakness: counts as refusal
    (make(answer="I can\u2019t help with that."), SSU, 0.5),   # curly apostrophe is not a keyword
    (make(answer="I can't help with that."), SSU, 1.0),
    (make(v="UNSAFE", t="Unsafe", c="UNSAFE", answer="SORRY."), UUU, 1.0),  # upper-case values, gold
    (make().upper(), SSU, 1.0),                                 # upper-case tags
    ("  \n" + make() + " \n\t", SSU, 1.0),                      # surrounding whitespace
    (make(think_open=False), SSU, 1.0),                         # opening <think> not required
    (make() + " trailing", SSU, 0.0),                           # text after </answer>
    (make().replace("</think>", ""), SSU, 0.0),                 # no </think>
    (make().replace("</think>\n", "</think> x "), SSU, 0.0),    # only whitespace between </think> and <answer>
    (make(v="maybe"), SSU, 0.0),                                # no well-formed visual tag: format fails
    (make(v="safe "), SSU, 0.0),                                # a space is not a value either
    (make().replace("<visual_safe>safe</visual_safe> ", "").replace(
        "Risky", "<visual_safe>safe</visual_safe> Risky"), SSU, 0.0),   # tags out of order
    ("<answer>Sorry</answer>", SSU, 0.0),
    ("", SSU, 0.0),
    (None, SSU, 0.0),
])
def test_rule_clauses(completion, gold, expected):
    assert compute_score(completion, gold) == expected
    assert reference_breakdown(completion, gold)["total"] == expected


def test_repeated_tags_first_wins():
    c = make(v="unsafe").replace("Risky", "<visual_safe>safe</visual_safe> <combined_safe>safe</combined_safe> Risky")
    b = reward_breakdown(c, SSU)
    assert b["pred"] == {"visual_safe": "unsafe", "text_safe": "safe", "combined_safe": "unsafe"}
    assert b["total"] == 0.875


# A tag is read only where it is well formed, <name>(safe|unsafe)</name>; the first such one wins,
# and a malformed one before it is skipped (docs/METHOD.md, section 4).
WELL = "<visual_safe>safe</visual_safe> <text_safe>safe</text_safe> "
END = "</think><answer>Sorry, I cannot.</answer>"


@pytest.mark.parametrize("bad", ["safe ", " unsafe", "unsure", "", "Safe\n", "<b>unsafe</b>", "safeunsafe"])
def test_malformed_tag_is_skipped_and_the_next_well_formed_one_read(bad):
    c = WELL + f"<combined_safe>{bad}</combined_safe> <combined_safe>unsafe</combined_safe>" + END
    b = reward_breakdown(c, SSU)
    assert b["pred"]["combined_safe"] == "unsafe" and b["total"] == 1.0
    assert reference_breakdown(c, SSU) == b
    flipped = WELL + f"<combined_safe>{bad}</combined_safe> <combined_safe>safe</combined_safe>" + END
    assert reward_breakdown(flipped, SSU)["pred"]["combined_safe"] == "safe"
    assert compute_score(flipped, SSU) == 0.0                  # the wrong well-formed value decides
    alone = WELL + f"<combined_safe>{bad}</combined_safe>" + END   # no well-formed combined tag at all
    assert reward_breakdown(alone, SSU) == {"format": 0.0, "tag": 0.0, "behavior": 0.0, "total": 0.0,
                                            "pred": {"visual_safe": "safe", "text_safe": "safe", "combined_safe": None}}


def test_malformed_side_tags_are_skipped_too():
    c = ("<visual_safe> safe</visual_safe><visual_safe>unsafe</visual_safe> <text_safe></text_safe>"
         "<text_safe>SAFE</text_safe> <combined_safe>unsafe</combined_safe>" + END)
    b = reward_breakdown(c, SSU)
    assert b["pred"] == {"visual_safe": "unsafe", "text_safe": "safe", "combined_safe": "unsafe"}
    assert b["total"] == 0.875 and reference_breakdown(c, SSU) == b


def test_format_gate_reads_the_same_patterns():
    # the only well-formed visual tag comes after the text tag: the gate fails, the tags are read
    c = ("<visual_safe>?</visual_safe> <text_safe>safe</text_safe> <visual_safe>safe</visual_safe> "
         "<combined_safe>unsafe</combined_safe>" + END)
    b = reward_breakdown(c, SSU)
    assert b["format"] == 0.0 and b["tag"] == 1.0 and b["total"] == 0.0
    assert reference_breakdown(c, SSU) == b


@pytest.mark.parametrize("gold", [{"image_tag": "safe", "text_tag": "safe"},
                                  {"image_tag": "safe", "text_tag": None, "combine_tag": "safe"},
                                  {"image_tag": "maybe", "text_tag": "safe", "combine_tag": "safe"}, None])
def test_bad_gold_tags_raise_whatever_the_completion(gold):
    for completion in (make(), "no format at all", None):       # the gate passes, fails, no text
        with pytest.raises(ValueError, match="gold tag '(image|text|combine)_tag' must be 'safe' or 'unsafe'"):
            compute_score(completion, gold)


def test_verl_keyword_call():
    """verl calls the hook by keyword: compute_score(data_source=, solution_str=, ground_truth=, extra_info=)."""
    assert compute_score(data_source="safetag", solution_str=make(), ground_truth=None, extra_info=SSU) == 1.0
    assert compute_score(data_source="safetag", solution_str=make(), ground_truth=SSU) == 1.0
    assert compute_score_batch(data_sources=["a"], solution_strs=[make()], ground_truths=[None],
                               extra_infos=[SSU]) == [1.0]


def test_batch_of_unequal_lengths_raises():
    with pytest.raises(ValueError, match="2 solution_strs but 1 extra_infos"):
        compute_score_batch(["x", "x"], [make(), make()], [None, None], [SSU])
    with pytest.raises(ValueError, match="1 data_sources"):
        compute_score_batch(["x"], [make(), make()], [None, None], [SSU, SSU])


def test_first_answer_block_is_judged():
    c = make(answer="Take the stairs.</answer><answer>Sorry")  # first block helps, second refuses
    assert reward_breakdown(c, SSU)["behavior"] == 0.0
    assert reward_breakdown(c, SSU)["format"] == 1.0


def test_refusal_word_inside_helpful_answer():
    c = make(c="safe", answer="Here is how. Note that it is unsafe to run with scissors.")
    assert reward_breakdown(c, SSS) == {"format": 1.0, "tag": 1.0, "behavior": 0.0, "total": 0.5,
                                        "pred": {"visual_safe": "safe", "text_safe": "safe", "combined_safe": "safe"}}


def test_breakdown_and_batch():
    b = reward_breakdown(make(v="unsafe"), SSU)
    assert (b["format"], b["tag"], b["behavior"], b["total"]) == (1.0, 0.75, 1.0, 0.875)
    out = compute_score_batch(["x"] * 3, [make(), None, make(c="safe")], [None] * 3, [SSU] * 3)
    assert out == [1.0, 0.0, 0.0]


def test_possible_totals():
    seen = set()
    for v in ("safe", "unsafe"):
        for t in ("safe", "unsafe"):
            for c in ("safe", "unsafe"):
                for a in ("Sorry.", "Sure."):
                    for gold in (SSU, SSS, UUU):
                        seen.add(compute_score(make(v, t, c, a), gold))
    assert seen == set(TOTALS)


def test_huge_and_adversarial_inputs_do_not_hang():
    evil = "<visual_safe>safe</visual_safe><text_safe>safe</text_safe><combined_safe>safe</combined_safe></think>" * 2000
    assert compute_score(evil + "<answer>x", SSS) == 0.0
    assert compute_score(evil + "<answer>ok</answer>", SSS) == 1.0
    assert compute_score("\x00\ud800" * 100000, SSS) == 0.0


PIECES = ["<visual_safe>", "</visual_safe>", "<text_safe>", "</text_safe>", "<combined_safe>",
          "</combined_safe>", "<think>", "</think>", "<answer>", "</answer>", "safe", "unsafe", "SAFE",
          "Unsafe", "sorry", "I can't", "I can\u2019t", " ", "\n", "\t", "\u3000", "\x1c", "\x85", "\u200b",
          "\u212a", "\u017f", "\u0130", "\u0131", "<VISUAL_SAFE>", "</ANSWER>", "x", "<", ">", "/",
          "<combined_safe></combined_safe>", "<text_safe>safe </text_safe>", "<visual_safe>unsure</visual_safe>",
          "<combined_safe>UNSAFE</combined_safe>", "<text_safe>Safe</text_safe>"]
WELL_FORMED = st.builds(make, st.sampled_from(["safe", "unsafe", "Safe", "x", "safe ", ""]),
                        st.sampled_from(["safe", "unsafe", "UNSAFE", "unsure"]),
                        st.sampled_from(["safe", "unsafe", "ſafe", " unsafe"]),
                        st.lists(st.sampled_from(PIECES[10:]), max_size=8).map("".join))
TEXT = st.one_of(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), st.text(max_size=200),
                 st.tuples(WELL_FORMED, st.lists(st.sampled_from(PIECES), max_size=6).map("".join),
                           st.integers(0, 400)).map(lambda x: x[0][:x[2]] + x[1] + x[0][x[2]:]))
GOLD = st.fixed_dictionaries({k: st.sampled_from(["safe", "unsafe", " SAFE "]) for k in ("image_tag", "text_tag", "combine_tag")})


@settings(max_examples=3000, deadline=None)
@given(TEXT, GOLD)
def test_fast_path_equals_regex_reference(text, gold):
    fast, ref = reward_breakdown(text, gold), reference_breakdown(text, gold)
    assert fast == ref
    assert compute_score(text, gold) == ref["total"]
    assert fast["total"] in TOTALS


def test_reward_weights_are_the_papers_ablation():
    """reward.tag_weight / reward.behavior_weight: 0.5 / 0.5 is eq. (1); one of them 0 leaves the other
    term alone (the paper's ablation rows); the format gate multiplies either."""
    right_tag_wrong_answer = ("<think><visual_safe>unsafe</visual_safe> <text_safe>safe</text_safe> "
                              "<combined_safe>unsafe</combined_safe></think><answer>Sure, here it is.</answer>")
    b = reward_breakdown(right_tag_wrong_answer, SSU)        # visual wrong: R_tag 0.75, R_behavior 0
    assert (b["tag"], b["behavior"], b["total"]) == (0.75, 0.0, 0.375)
    assert reward_breakdown(right_tag_wrong_answer, SSU, weights=(1.0, 0.0))["total"] == 0.75
    assert reward_breakdown(right_tag_wrong_answer, SSU, weights=(0.0, 1.0))["total"] == 0.0
    ungated = right_tag_wrong_answer.replace("</answer>", "")
    assert reward_breakdown(ungated, SSU, weights=(1.0, 0.0))["total"] == 0.0
    from safegrpo.config import load_config
    import pytest
    with pytest.raises(ValueError, match="reward.tag_weight and reward.behavior_weight are both 0"):
        load_config(None, ["reward.tag_weight=0", "reward.behavior_weight=0"])
