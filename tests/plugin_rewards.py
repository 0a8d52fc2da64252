"""Reward plug-ins for the tests (reward.plugin: plugin_rewards:NAME), in verl's signature."""
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


def exits(data_source, solution_str, ground_truth, extra_info):
    """Calls sys.exit(0) on the texts raises_on_odd rejects, else 1."""
    import sys
    if sum(map(ord, solution_str)) % 2:
        sys.exit(0)
    return 1.0


def dies_once(data_source, solution_str, ground_truth, extra_info):
    """Kills its worker process the first time it sees "ab" (a marker file remembers), else 1."""
    import os
    marker = extra_info.get("marker")
    if solution_str == "ab" and marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return 1.0


def sleeps(data_source, solution_str, ground_truth, extra_info):
    """1 after a 1 s sleep."""
    time.sleep(1.0)
    return 1.0


def empties_batch(data_sources, solution_strs, ground_truths, extra_infos):
    """A batch plug-in that empties its input lists in place and returns nothing."""
    solution_strs.clear()
    return []


def constant(data_source, solution_str, ground_truth, extra_info):
    """0.5 for every completion: no group has reward spread (DAPO keeps none)."""
    return 0.5


def as_text(data_source, solution_str, ground_truth, extra_info):
    """A score given as text ("0.75"): a bug, not a number."""
    return "0.75"


def as_bool(data_source, solution_str, ground_truth, extra_info):
    return True


def hard_exits(data_source, solution_str, ground_truth, extra_info):
    """os._exit(0) on the texts raises_on_odd rejects (no exception, no atexit: the process ends)."""
    import os
    if sum(map(ord, solution_str)) % 2:
        os._exit(0)
    return 1.0


def barrier(data_source, solution_str, ground_truth, extra_info):
    """Holds the run at its first reward: writes $SAFEGRPO_BARRIER.reached, then waits (at most
    300 s) for $SAFEGRPO_BARRIER.release. A test's way to keep a run alive, not a step count."""
    import os
    from pathlib import Path
    base = os.environ["SAFEGRPO_BARRIER"]
    Path(base + ".reached").touch()
    t0 = time.time()
    while not Path(base + ".release").exists() and time.time() - t0 < 300:
        time.sleep(0.05)
    return 1.0
