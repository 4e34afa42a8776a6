"""dipod.lm.train_checkpoints on a one-process stand-in trainer (a linear policy, its optimizer and
schedule): a checkpoint restores the whole training state, including the non-finite-update streak, so
a resumed run is the uninterrupted run; every spelling of "the newest checkpoint" finds it. Under a
sharding engine (a stand-in runtime) the engine's shards are the checkpoint and resume only under
that engine; under ZeRO-3 / FSDP final_model/ (the tiny model) holds the weights gathered from them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dipod.checkpoint import META, list_checkpoints, load_checkpoint
from dipod.config import config_to_dict
from dipod.lm import train_checkpoints
from dipod.lm.engines import ENGINE_STATE, Engine
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


class _ShardingRuntime:
    """A stand-in for a DeepSpeed / FSDP runtime (dipod.lm.engines.Engine) on one process: its state
    is saved by the engine itself, as a file in the staging folder the real engine names."""

    kind, shards_state = "deepspeed", True
    staging_dir = Engine.staging_dir

    def __init__(self, trainer):
        self.trainer = trainer

    def save_shards(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        torch.save({"model": self.trainer.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict()},
                   folder / "shard_rank0.pt")

    def load_shards(self, folder: Path) -> None:
        state = torch.load(folder / "shard_rank0.pt")
        self.trainer.model.load_state_dict(state["model"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])


def _optimizer_tensors(trainer) -> list[list[float]]:
    return [t.flatten().tolist() for s in trainer.optimizer.state_dict()["state"].values() for t in s.values()]


def _sharded(trainer):
    trainer.runtime = _ShardingRuntime(trainer)
    return trainer


def _train(run, updates=3):
    for _ in range(updates):
        run.model(torch.ones(1, 2)).sum().backward()
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()


def test_a_sharding_engine_checkpoints_its_own_shards_and_resumes_from_them(tmp_path):
    """Under DeepSpeed / FSDP the weights and optimizer are the engine's shards, sealed in the checkpoint's
    engine/ folder (no second copy beside them); --resume hands that folder back to the engine."""
    run = _sharded(_trainer(tmp_path))
    _train(run)
    train_checkpoints.save(run, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]  # the staging folder moved in
    weights, state, meta = load_checkpoint(tmp_path / "checkpoint-3")
    assert weights == {} and "optimizer" not in state and meta["engine"] == "deepspeed"
    assert (tmp_path / "checkpoint-3" / ENGINE_STATE / "shard_rank0.pt").is_file()

    resumed = _sharded(_trainer(tmp_path, resume="latest", weight=5.0))
    train_checkpoints.restore(resumed)
    assert resumed.start_step == 3 and torch.equal(resumed.model.weight, run.model.weight)
    assert _optimizer_tensors(resumed) == _optimizer_tensors(run)


@pytest.mark.parametrize("written_by, resumed_by", [("deepspeed", "ddp"), ("fsdp", "ddp"), ("ddp", "deepspeed"),
                                                    (None, "deepspeed")])
def test_a_checkpoint_of_sharded_state_resumes_only_under_the_engine_that_wrote_it(tmp_path, written_by, resumed_by):
    """None: a checkpoint written before checkpoints named their engine, i.e. by DDP."""
    run = _trainer(tmp_path)
    train_checkpoints.save(run, 1)
    meta_file = tmp_path / "checkpoint-1" / META
    meta = json.loads(meta_file.read_text())
    assert meta["engine"] == "single"
    meta.pop("engine") if written_by is None else meta.update(engine=written_by)
    meta_file.write_text(json.dumps(meta))
    resumed = _trainer(tmp_path, resume="latest")
    resumed.runtime = SimpleNamespace(kind=resumed_by, shards_state=resumed_by != "ddp")
    with pytest.raises(ValueError) as refused:
        train_checkpoints.restore(resumed)
    assert str(refused.value) == (f"checkpoint {tmp_path / 'checkpoint-1'} was written under {written_by or 'ddp'}, "
                                  f"this run is {resumed_by}; resume under the same engine (accelerate config) "
                                  "that wrote it")


def test_a_whole_model_checkpoint_resumes_under_one_process_or_ddp_alike(tmp_path):
    run = _trainer(tmp_path)
    _train(run)
    train_checkpoints.save(run, 3)
    resumed = _trainer(tmp_path, resume="latest", weight=5.0)
    resumed.runtime = SimpleNamespace(kind="ddp", shards_state=False)
    train_checkpoints.restore(resumed)
    assert resumed.start_step == 3 and torch.equal(resumed.model.weight, run.model.weight)


def test_a_checkpoint_lacking_a_weight_the_run_trains_is_refused_naming_the_fix(tmp_path):
    train_checkpoints.save(_trainer(tmp_path), 1)
    resumed = _trainer(tmp_path, resume="latest")
    resumed.model = torch.nn.Linear(2, 1, bias=True)  # e.g. other LoRA settings: a trainable weight more
    with pytest.raises(ValueError) as refused:
        train_checkpoints.restore(resumed)
    assert str(refused.value) == (f"checkpoint {tmp_path / 'checkpoint-1'} does not fit this model (missing ['bias'], "
                                  "unexpected []); resume with the same --model and LoRA settings")


def test_keep_checkpoints_keeps_the_newest_n_and_the_checkpoint_records_the_runs_config(tmp_path):
    run = _trainer(tmp_path)
    run.cfg = run.cfg.with_changes(keep_checkpoints=3, lora_target_modules=("q_proj", "v_proj"))
    for step in (1, 2, 3, 4):
        train_checkpoints.save(run, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    meta = load_checkpoint(tmp_path / "checkpoint-4")[2]
    assert meta["config"] == {**config_to_dict(run.cfg), "lora_target_modules": ["q_proj", "v_proj"]}


def _gathering_trainer(tmp_path, gathered):
    """A stand-in main process of a ZeRO-3 / FSDP run of the tiny model (full fine-tuning in bf16, float32
    master weights): its runtime gathers the whole state dict from the shards (``gathered(model)``); the
    process's own view of the model (``frozen_view``) is only its partition, here the untrained weights."""
    from dipod.lm import train_engine
    from dipod.lm.model import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32,
                              max_positions=64)
    cfg = TrainConfig(model=str(folder), task="sudoku4", lora_r=0, dtype="bfloat16", output_dir=str(tmp_path / "run"))
    view = train_engine.load_policy(cfg.with_changes(dtype="float32"), device="cpu")
    runtime = SimpleNamespace(gathered_state_dict=gathered, whole_model_loading=contextlib.nullcontext,
                              weights_dtype="float32")
    return SimpleNamespace(cfg=cfg, model=view.model, frozen_view=view, engine=train_engine, runtime=runtime,
                           accelerator=SimpleNamespace(is_main_process=True))


def _trained(model) -> dict[str, torch.Tensor]:
    return {k: v + 0.25 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_under_zero3_or_fsdp_final_model_holds_the_weights_gathered_from_the_shards(tmp_path):
    from dipod.lm.model import load_masked_lm

    trainer = _gathering_trainer(tmp_path, _trained)
    expected = _trained(trainer.model)
    train_checkpoints.save_final_model(trainer, tmp_path / "final_model")
    saved = load_masked_lm(str(tmp_path / "final_model"), dtype="float32").model.state_dict()
    assert saved.keys() == expected.keys()
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], expected[k]) for k in expected)


def test_a_partial_gather_never_becomes_a_final_model(tmp_path):
    """A gathered state dict without every weight (e.g. ZeRO-3 without zero3_save_16bit_model) is refused."""
    trainer = _gathering_trainer(tmp_path, lambda model: dict(list(_trained(model).items())[1:]))
    with pytest.raises(RuntimeError, match="Missing key"):
        train_checkpoints.save_final_model(trainer, tmp_path / "final_model")
    assert not (tmp_path / "final_model").exists()
