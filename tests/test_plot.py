"""`dipod plot`: overlays runs of any kind (LM or control) from their metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from dipod.plot import choose_keys, main, plot_runs


def _run(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_lm_runs_get_reward_accuracy_and_gap_panels(tmp_path):
    a = _run(tmp_path / "a", [{"step": 0, "eval/accuracy": 0.3}, {"step": 1, "reward": 0.1, "gap_lower_bound": 0.5},
                              {"step": 2, "reward": 0.4, "gap_lower_bound": "nan", "eval/accuracy": 0.5}])
    b = _run(tmp_path / "b", [{"step": 1, "reward": 0.2}])
    assert choose_keys({"a": [{"reward": 1.0, "gap_lower_bound": 0.2, "eval/accuracy": 0.1, "loss": 3.0}]}) == [
        "reward", "eval/accuracy", "gap_lower_bound"]
    out = plot_runs([a, b], tmp_path / "both.png")
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_control_runs_plot_whatever_numeric_keys_exist(tmp_path, capsys):
    run = _run(tmp_path / "ctl", [{"step": s, "episode_length": 10 * s, "value_loss": 1.0 / (s + 1), "note": "x",
                                   "done": True} for s in range(5)])
    assert choose_keys({"r": [{"step": 1, "episode_length": 3, "value_loss": 0.1, "done": True}]}) == [
        "episode_length", "value_loss"]
    assert main([str(run), "--smooth", "2"]) == 0
    assert (run / "plot.png").is_file() and str(run / "plot.png") in capsys.readouterr().out


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_runs([tmp_path / "nothing"], tmp_path / "x.png")
    run = _run(tmp_path / "empty", [{"step": 1, "note": "text only"}])
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_runs([run], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one label per run"):
        plot_runs([run], tmp_path / "x.png", keys=["a"], labels=["1", "2"])


def test_smoothing_is_a_trailing_mean_over_the_points_that_exist(tmp_path, monkeypatch):
    """`--smooth W` draws, at each logged point i, the mean of the last min(W, i + 1) values: the first points
    average only what exists (no pull towards 0), the x positions stay the logged steps, and W = 1 draws the
    raw values."""
    import matplotlib.figure

    drawn = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.append([(list(line.get_xdata()), list(line.get_ydata())) for ax in fig.axes for line in ax.get_lines()])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    run = _run(tmp_path / "r", [{"step": 10 * s, "reward": float(v)} for s, v in enumerate([4, 8, 2, 6, 10])])
    plot_runs([run], tmp_path / "s3.png", keys=["reward"], smooth=3)
    plot_runs([run], tmp_path / "s1.png", keys=["reward"], smooth=1)
    (xs, ys), = drawn[0]
    assert xs == [0, 10, 20, 30, 40]
    assert ys == pytest.approx([4.0, 6.0, 14 / 3, 16 / 3, 6.0], abs=1e-12)
    assert drawn[1] == [([0, 10, 20, 30, 40], [4.0, 8.0, 2.0, 6.0, 10.0])]
