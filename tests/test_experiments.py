"""experiments/shortcut.py: the statistics of its table, on hand-made runs with known answers."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "shortcut", Path(__file__).resolve().parents[1] / "experiments" / "shortcut.py")
shortcut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shortcut)


def test_interval_is_the_students_t_interval_closed_form():
    # mean 2, sample std 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    mean, low, high = shortcut.interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(4.303 / 3 ** 0.5) and mean - low == pytest.approx(high - mean)
    # 5 seeds: t(0.975, 4) = 2.776
    _, low, high = shortcut.interval([0.0, 0.0, 1.0, 1.0, 0.5])
    sd = (sum((x - 0.5) ** 2 for x in [0, 0, 1, 1, 0.5]) / 4) ** 0.5
    assert (high - low) / 2 == pytest.approx(2.776 * sd / 5 ** 0.5)
    with pytest.raises(ValueError):
        shortcut.interval([1.0])


def _run(acc, conflict):
    scores = {"accuracy": acc, "conflict_accuracy": conflict}
    return {"before": {"accuracy": 0.4, "conflict_accuracy": 0.3}, "after": scores, "curve": []}


def test_paired_differences_are_taken_seed_by_seed():
    """A recipe that beats GRPO by exactly +0.1 on every seed, though the seeds themselves
    differ by much more: the paired interval is +0.1 with zero width, the unpaired spread is not."""
    runs = {"grpo": {0: _run(0.2, 0.1), 1: _run(0.6, 0.5), 2: _run(0.4, 0.2)},
            "papo-g": {0: _run(0.3, 0.1), 1: _run(0.7, 0.5), 2: _run(0.5, 0.2)}}
    summary, table = shortcut.summarise(runs)
    paired = summary["paired"]["papo-g"]["accuracy"]
    assert paired["mean"] == pytest.approx(0.1)
    assert paired["low"] == pytest.approx(0.1) and paired["high"] == pytest.approx(0.1)
    assert paired["per_seed"] == pytest.approx([0.1, 0.1, 0.1])
    assert summary["paired"]["papo-g"]["conflict_accuracy"]["mean"] == pytest.approx(0.0)
    assert summary["recipes"]["grpo"]["accuracy"] == [0.2, 0.6, 0.4]
    # what RL did, per recipe: after minus its own warm start (0.4 on every seed here)
    assert summary["change"]["grpo"]["accuracy"]["per_seed"] == pytest.approx([-0.2, 0.2, 0.0])
    assert summary["change"]["papo-g"]["accuracy"]["mean"] == pytest.approx(0.1)
    assert "| papo-g | 3 | 0.500 ± 0.200 |" in table
    # a seed only one recipe finished is left out of the pairing
    runs["papo-g"][3] = _run(0.9, 0.9)
    assert shortcut.summarise(runs)[0]["paired"]["papo-g"]["accuracy"]["per_seed"] == \
        pytest.approx([0.1, 0.1, 0.1])


def test_one_common_seed_gives_a_difference_but_no_interval():
    runs = {"grpo": {0: _run(0.2, 0.1)}, "papo-g": {0: _run(0.3, 0.2)}}
    summary, table = shortcut.summarise(runs)
    assert summary["paired"]["papo-g"]["accuracy"]["low"] is None
    assert "[one seed]" in table
