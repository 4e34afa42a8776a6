"""benchmarks/lm_dipod_report.py: the Table 1 page's numbers from metrics rows, and a rebuilt page with a
method none of whose runs has finished yet (``--report_only`` while the benchmark still runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lm_dipod_report import mean_ci, method_table, plot, summarize  # noqa: E402


def _run(accuracies: list[float], rewards: list[float]) -> list[dict]:
    """metrics rows of a run: a reward per step, held-out accuracy at the first, middle and last step."""
    rows = [{"step": i, "reward": r, "step_time": 2.0, "gap_lower_bound": 1.0} for i, r in enumerate(rewards)]
    for row, acc in zip((rows[0], rows[len(rows) // 2], rows[-1]), accuracies):
        row.update({"eval/accuracy": acc, "eval/reward": acc, "eval/gap_lower_bound": 0.5})
    return rows


def test_summary_reads_final_peak_and_the_worst_reward_drop():
    s = summarize(_run([0.2, 0.9, 0.4], [0.1, 0.5, 0.8, 0.3, 0.6, 0.7, 0.2, 0.5]))
    assert (s["initial_accuracy"], s["peak_accuracy"], s["accuracy"]) == (0.2, 0.9, 0.4)
    assert s["gain"] == pytest.approx(0.2) and s["worst_reward_drop"] == pytest.approx(0.6)  # 0.8 -> 0.2
    assert s["outcome"] == "learns"  # held-out +0.2 (>= 0.05) counts before the reward's fall
    # the t-interval: two seeds 0.4 and 0.6 -> 0.5 ± 12.706 * 0.1414 / sqrt(2)
    mean, half = mean_ci([0.4, 0.6])
    assert mean == pytest.approx(0.5) and half == pytest.approx(12.706 * 0.1)


def test_a_method_without_finished_runs_is_listed_as_not_finished_and_the_plot_skips_it(tmp_path):
    run = _run([0.2, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4])
    results = {"sudoku4": {"spg_mix": [run], "placebo": []}}
    summary = {"sudoku4": {"spg_mix": [{**summarize(run), "wall_s": 10.0}], "placebo": []}}
    paper = {"sudoku4": {"spg_mix": [{"spg_test": 0.55}], "placebo": []}}
    lines = method_table(["sudoku4"], ["placebo", "spg_mix"], summary, paper, {"sudoku4": {"spg_test": 0.3}})
    assert "| sudoku4 | placebo | 0 | not finished yet |" in lines[3]
    assert lines[3].count("|") == lines[0].count("|")  # the row has every column
    assert lines[4].startswith("| sudoku4 | spg_mix | 1 | 0.200 -> 0.600 | 0.600 | 0.400 | 0.550 |")
    plot(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_task_without_any_finished_run_gets_one_row():
    lines = method_table(["countdown"], ["spg_mix"], {"countdown": {"spg_mix": []}}, {"countdown": {"spg_mix": []}},
                         {"countdown": {}})
    assert lines[2:] == ["| countdown | every method | 0 | not finished yet | | | | | | | | | | |"]
