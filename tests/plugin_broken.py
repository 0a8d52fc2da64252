"""A reward plug-in whose import fails (tests/test_reward_plugin.py)."""
raise RuntimeError("the plug-in's own setup failed")


def score(data_source, solution_str, ground_truth, extra_info):   # never reached
    return 1.0
