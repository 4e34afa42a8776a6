"""dipod.lm.train_checkpoints on a one-process stand-in trainer (a linear policy, its optimizer and
schedule): a checkpoint restores the whole training state, including the non-finite-update streak, so
a resumed run is the uninterrupted run; every spelling of "the newest checkpoint" finds it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dipod.lm import train_checkpoints
from dipod.lm.train_config import TrainConfig


def _trainer(out, resume=None, weight=0.0):
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(model.weight, weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, unwrap_model=lambda m: m,
                                  print=print)
    runtime = SimpleNamespace(kind="single", shards_state=False, staging_dir=None)
    cfg = TrainConfig(model="tiny", task="sudoku4", output_dir=str(out), resume=resume, keep_checkpoints=2)
    return SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                           runtime=runtime, nonfinite_streak=0, start_step=0)


@pytest.mark.parametrize("spelling", ["latest", "true", "auto"])
def test_resume_restores_weights_optimizer_schedule_and_the_nonfinite_streak(tmp_path, spelling):
    run = _trainer(tmp_path)
    for _ in range(3):  # three real updates: Adam moments and the schedule move
        run.model(torch.ones(1, 2)).sum().backward()
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    run.nonfinite_streak = 2  # two skipped updates in a row just before the save
    train_checkpoints.save(run, 3)

    resumed = _trainer(tmp_path, resume=spelling, weight=5.0)
    train_checkpoints.restore(resumed)
    assert resumed.start_step == 3 and resumed.nonfinite_streak == 2  # a third skip would stop at the same step
    assert torch.equal(resumed.model.weight, run.model.weight)
    assert resumed.scheduler.state_dict() == run.scheduler.state_dict()
    moments = [s["exp_avg"] for s in run.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, [s["exp_avg"] for s in
                                                          resumed.optimizer.state_dict()["state"].values()]))


def test_resume_of_a_folder_without_checkpoints_starts_from_step_0(tmp_path, caplog):
    fresh = _trainer(tmp_path, resume="true", weight=1.5)
    with caplog.at_level("WARNING"):
        train_checkpoints.restore(fresh)
    assert fresh.start_step == 0 and float(fresh.model.weight[0, 0]) == 1.5
    assert "no checkpoint" in caplog.text
