"""The demo task's control judgments (bench/quality.py --controls): each keeps the verifier's
verdict (which answers are wrong) and changes only what the judgment says: terse says nothing
but "wrong", digit-only names the digit without the reason, swapped gives every negative another
problem's judgment (never its own problem's), reproducibly by seed."""

import pytest

from cut_core.tasks.arithmetic import (CONTROLS, TERSE_JUDGMENT, control_judgments, judge, judge_digit_only,
                                judge_terse, swap_judgments)

PROBLEMS = ["What is 17 + 28?", "What is 11 + 12?", "What is 39 + 45?", "What is 55 + 36?", "What is 23 + 19?"]
ANSWERS = ["35", "23", "74", "81", "32"]          # all wrong (dropped carry) except 11 + 12 = 23


def test_terse_and_digit_only_keep_the_verdict_and_drop_the_content():
    for x, y in zip(PROBLEMS, ANSWERS):
        full = judge(x, y)
        assert (judge_terse(x, y) is None) == (full is None) == (judge_digit_only(x, y) is None)
        if full is not None:
            assert judge_terse(x, y) == TERSE_JUDGMENT
            assert judge_digit_only(x, y) == "The tens digit is wrong." and full.startswith("The tens digit is wrong:")


@pytest.mark.parametrize("seed", range(5))
def test_swapped_judgments_come_from_other_problems(seed):
    truth = [judge(x, y) for x, y in zip(PROBLEMS, ANSWERS)]
    swapped = swap_judgments(PROBLEMS, truth, seed)
    assert [j is None for j in swapped] == [j is None for j in truth]
    assert sorted(j for j in swapped if j) == sorted(j for j in truth if j)
    assert all(s != t for s, t in zip(swapped, truth) if t is not None)
    assert swapped == control_judgments("swapped", PROBLEMS, ANSWERS, seed)
    assert swap_judgments(PROBLEMS, truth[:1] + [None] * 4, seed) == truth[:1] + [None] * 4  # nothing to swap with


def test_controls_are_named_and_unknown_ones_refused():
    assert set(CONTROLS) == {"swapped", "terse", "digit_only"}
    assert control_judgments(None, PROBLEMS, ANSWERS) == [judge(x, y) for x, y in zip(PROBLEMS, ANSWERS)]
    with pytest.raises(ValueError, match="unknown control"):
        control_judgments("shuffled", PROBLEMS, ANSWERS)
