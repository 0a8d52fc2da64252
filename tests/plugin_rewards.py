"""Reward plug-ins for the tests (grpo.reward: plugin_rewards:NAME), in verl's signature."""
import time


def half_constant(data_source, solution_str, ground_truth, extra_info):
    """0 for every completion of a record whose combined tag is safe (those groups have no
    spread), else a score that varies with the text."""
    if ground_truth["combine_tag"] == "safe":
        return 0.0
    return (sum(map(ord, solution_str)) % 5) / 4


def half_constant_batch(data_sources, solution_strs, ground_truths, extra_infos):
    return [{"score": half_constant(d, s, g, e)} for d, s, g, e in zip(data_sources, solution_strs, ground_truths,
                                                                     extra_infos)]


def raises_on_odd(data_source, solution_str, ground_truth, extra_info):
    """Raises for texts of odd character sum, else 1."""
    if sum(map(ord, solution_str)) % 2:
        raise RuntimeError("plug-in failure")
    return 1.0


def sleeps_when_long(data_source, solution_str, ground_truth, extra_info):
    """Hangs (60 s) on the texts that raises_on_odd rejects, else 1."""
    if sum(map(ord, solution_str)) % 2:
        time.sleep(60)
    return 1.0
