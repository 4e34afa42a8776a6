"""What bad folders, full disks, corrupt checkpoints and diverging runs do to `lm sft`, `lm train`
and `control train`: one message naming the problem and the fix, before any model loads where
possible, and nothing lost. Also: the same seed gives the same run with the default LoRA."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import dipod.checkpoint as ckpt
from dipod.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dipod.cli import main as cli_main
from dipod.control.runner import ControlConfig, Runner
from dipod.lm import train_engine
from dipod.lm.sft import SFTConfig, train_sft
from dipod.lm.train_config import TrainConfig
from dipod.lm.trainer import TIMING_KEYS, Trainer, train
from dipod.run_folder import RunFolderError, check_writable, prepare_run_folder
from dipod.runlog import MetricsLogger, TrainingDiverged, read_metrics


# the tiny model and one torch thread, as the trainer's tests use them
from test_lm_trainer import one_thread, tiny_model  # noqa: F401


def rl(tiny_model: str, out: Path, **changes) -> TrainConfig:
    values = dict(model=tiny_model, task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                  prompts_per_step=2, num_generations=2, gradient_accumulation_steps=1, gen_length=24, block_length=24,
                  diffusion_steps=4, num_iterations=1, learning_rate=1e-3, max_steps=2, save_steps=1, eval_steps=0,
                  eval_examples=1, gap_monitor_steps=0, num_draws=2, masking="unbiased_random", tensorboard=False,
                  progress_bar=False, save_final_model=False, output_dir=str(out))
    values.update(changes)
    return TrainConfig(**values)


def sft(out: Path, **changes) -> SFTConfig:
    values = dict(model="tiny", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, tiny_intermediate_size=64,
                  task="sudoku4", train_examples=16, eval_examples=0, gen_length=24, block_length=24, steps=4,
                  max_steps=3, batch_size=4, warmup_steps=0, save_every=1, progress_bar=False, output_dir=str(out))
    values.update(changes)
    return SFTConfig(**values)


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# ------------------------------------------------------------------ a run folder is never replaced silently

def test_sft_refuses_a_folder_holding_a_run_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    train_sft(sft(out))
    rows_before = read_metrics(out / "metrics.jsonl")
    with pytest.raises(RunFolderError, match="already holds a run.*pass --resume to.*--overwrite true"):
        train_sft(sft(out, max_steps=1))
    assert read_metrics(out / "metrics.jsonl") == rows_before  # nothing touched
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(RunFolderError, match="only one of them"):
        train_sft(sft(out, resume=True, overwrite=True))
    (out / "notes.txt").write_text("mine")
    train_sft(sft(out, max_steps=1, overwrite=True))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # the old run's checkpoints are gone
    assert (out / "notes.txt").read_text() == "mine"  # and nothing that was not the run's


@pytest.mark.parametrize("left", ["metrics.jsonl", "checkpoint-3"])
def test_a_run_killed_before_or_after_its_first_checkpoint_is_never_replaced_silently(tmp_path, left):
    """A folder holding only metrics.jsonl (killed before the first save) or only a checkpoint is a run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / left).mkdir() if left.startswith("checkpoint") else (out / left).write_text('{"step": 1}\n')
    with pytest.raises(RunFolderError, match=f"already holds a run \\({left}\\)"):
        prepare_run_folder(out, resuming=False, overwrite=False, resume_flag="--resume latest")
    assert (out / left).exists()
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("x: 1\n")  # a config alone is no run yet
    assert prepare_run_folder(tmp_path / "fresh", resuming=False, overwrite=False, resume_flag="--resume") == \
        tmp_path / "fresh"


def test_one_writer_per_run_folder_a_live_holder_is_refused_a_stale_lock_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from dipod.run_folder import LOCK_FILE, release_run_lock

    out, host = tmp_path / "run", socket.gethostname()
    out.mkdir()
    lock = out / LOCK_FILE
    # a live process that is not this one: a child of the test's own (under mutmut, the parent is mutmut)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock.write_text(json.dumps({"pid": live.pid, "host": host}))
    try:
        for resuming in (False, True):  # a second run, or a --resume beside the live ranks
            with pytest.raises(RunFolderError, match=rf"in use by another run \(process {live.pid} on "):
                prepare_run_folder(out, resuming=resuming, overwrite=False, resume_flag="--resume latest")
    finally:
        live.kill()
        live.wait()
    lock.write_text(json.dumps({"pid": 4242, "host": host + "-elsewhere"}))  # cannot be checked: refused
    with pytest.raises(RunFolderError, match=f"delete {lock}"):
        prepare_run_folder(out, resuming=True, overwrite=False, resume_flag="--resume latest")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": host}))  # its run crashed: stale
    prepare_run_folder(out, resuming=True, overwrite=False, resume_flag="--resume latest")
    assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": host}
    prepare_run_folder(out, resuming=True, overwrite=False, resume_flag="--resume latest")  # this process again
    prepare_run_folder(out, resuming=True, overwrite=False, resume_flag="--resume latest", remove=False)  # a rank
    release_run_lock(out)
    assert not lock.exists()


def test_a_finished_run_gives_its_folder_back(tmp_path):
    from dipod.run_folder import LOCK_FILE

    train_sft(sft(tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_lm_train_refuses_a_folder_holding_a_run_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(rl(tiny_model, out, max_steps=1))
    loads = []
    monkeypatch.setattr(train_engine, "load_policy", lambda *a, **k: loads.append(1))
    with pytest.raises(RunFolderError, match="pass --resume to continue"):
        train(rl(tiny_model, out))
    assert loads == [] and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


def test_same_seed_same_run_with_the_default_lora_and_exact_resume(tiny_model, tmp_path, monkeypatch):
    lora = dict(lora_r=TrainConfig().lora_r, lora_dropout=0.05, max_steps=3)
    first = train(rl(tiny_model, tmp_path / "a", **lora))
    second = train(rl(tiny_model, tmp_path / "b", **lora))
    rows_a, rows_b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert strip(rows_a) == strip(rows_b) and rows_a[1]["grad_norm"] > 0
    weights_a, weights_b = first.model.state_dict(), second.model.state_dict()
    assert any("lora" in k for k in weights_a) and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    original = Trainer.step

    def dies_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(rl(tiny_model, tmp_path / "c", **lora))
    monkeypatch.setattr(Trainer, "step", original)
    resumed = train(rl(tiny_model, tmp_path / "c", resume="latest", **lora))
    assert strip(read_metrics(tmp_path / "c" / "metrics.jsonl")) == strip(rows_a)
    weights_c = resumed.model.state_dict()
    assert all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


# ------------------------------------------------------------------ folders and disks

def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "run"
    return Path("/sys/dipod-run")  # root ignores permissions; sysfs refuses new files even to root


def test_output_dir_problems_are_one_message_before_the_model_loads(tmp_path, tiny_model, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    loads = []
    monkeypatch.setattr(train_engine, "load_policy", lambda *a, **k: loads.append(1))
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        train(rl(tiny_model, a_file))
    with pytest.raises(RunFolderError, match="a part of the path is a file"):
        check_writable(a_file / "run")
    read_only = _read_only_dir(tmp_path)
    try:
        read_only.mkdir(parents=True)
        pytest.skip(f"{read_only} is writable here")
    except OSError:
        pass
    with pytest.raises(RunFolderError, match="cannot be written"):
        train(rl(tiny_model, read_only))
    assert loads == []
    code = cli_main(["lm", "sft", "--output_dir", str(a_file), "--max_steps", "1"])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert cli_main(["control", "train", "--env", "Pendulum-v1", "--output_dir", str(read_only)]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_a_full_disk_is_named_and_refused_up_front(tmp_path, monkeypatch):
    usage = type("Usage", (), {"total": 10, "used": 10, "free": 0})
    monkeypatch.setattr("dipod.run_folder.shutil.disk_usage", lambda path: usage)
    with pytest.raises(RunFolderError, match="is full .no space left on device"):
        prepare_run_folder(tmp_path / "run", resuming=False, overwrite=False, resume_flag="--resume latest")


def test_a_disk_that_fills_during_a_save_is_named_and_the_earlier_checkpoint_kept(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1000)}, {}, {})

    def full(tensors, filename, *args, **kwargs):  # what safetensors raises on a full disk
        raise RuntimeError("failed to write: unexpected pos 4096")

    monkeypatch.setattr(ckpt, "save_file", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 100})())
    with pytest.raises(OSError, match="no space left on the disk holding .* while writing checkpoint-2") as info:
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(1000)}, {}, {})
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


# ------------------------------------------------------------------ corrupt checkpoints

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_sft_and_lm_train_resume_from_the_newest_intact_checkpoint(tmp_path, tiny_model, caplog):
    out = tmp_path / "sft"
    train_sft(sft(out, max_steps=2, keep_checkpoints=3))
    _truncate(out / "checkpoint-2" / ckpt.WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="dipod.checkpoint"):
        result = train_sft(sft(out, max_steps=3, keep_checkpoints=3, resume=True))
    assert "checkpoint-2" in caplog.text and "resuming from" in caplog.text and result["final_step"] == 3
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]  # step 2 redone from checkpoint-1

    out = tmp_path / "rl"
    train(rl(tiny_model, out, max_steps=2, keep_checkpoints=3))
    (out / "checkpoint-2" / ckpt.STATE).write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dipod.checkpoint"):
        train(rl(tiny_model, out, max_steps=2, keep_checkpoints=3, resume="latest"))
    assert f"{out / 'checkpoint-2' / ckpt.STATE} cannot be read" in caplog.text
    assert load_checkpoint(out / "checkpoint-2")[2]["step"] == 2  # redone and rewritten whole


def test_control_resume_and_eval_skip_a_corrupt_newest_checkpoint(tmp_path, caplog, capsys):
    fast = dict(env="Pendulum-v1", num_envs=2, rollout_steps=64, epochs=1, minibatches=2, actor_hidden=[16],
                critic_hidden=[16], sampling_steps=2, num_draws=4, knn_entropy_k=3, progress_bar=False, tensorboard=False,
                save_every=1, keep_checkpoints=3, output_dir=str(tmp_path))
    Runner(ControlConfig(total_steps=256, **fast)).train()
    _truncate(tmp_path / "checkpoint-256" / ckpt.WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="dipod.checkpoint"):
        runner = Runner(ControlConfig(total_steps=384, resume="auto", **fast))
    assert runner.global_step == 128 and "checkpoint-256" in caplog.text
    runner.close()
    assert cli_main(["control", "eval", "--checkpoint", str(tmp_path / "checkpoint-256")]) == 2
    assert "model.safetensors cannot be read" in capsys.readouterr().err


# ------------------------------------------------------------------ divergence

def test_lm_train_divergence_advice_fits_the_run(tiny_model, tmp_path, monkeypatch):
    real = train_engine.compute_proxies

    def nan_after_step_1(lm, *args, **kwargs):
        out = real(lm, *args, **kwargs)
        if torch.is_grad_enabled() and nan_after_step_1.step > 1:
            return dataclasses.replace(out, elbo_nk=out.elbo_nk * float("nan"), elbo_n=out.elbo_n * float("nan"))
        return out

    nan_after_step_1.step = 0
    original = Trainer.step

    def counting(self, step):
        nan_after_step_1.step = step
        return original(self, step)

    monkeypatch.setattr(train_engine, "compute_proxies", nan_after_step_1)
    monkeypatch.setattr(Trainer, "step", counting)
    with pytest.raises(TrainingDiverged) as info:
        train(rl(tiny_model, tmp_path, estimator="fpo", max_steps=3, max_nonfinite_updates=1))
    message = str(info.value)
    assert "lower --learning_rate" in message and "smaller --max_grad_norm" in message
    assert "raise --max_grad_norm" not in message and "--dtype" not in message  # a float32 run
    assert "checkpoint-1 (intact)" in message


def test_sft_divergence_is_one_message_and_promises_only_a_checkpoint_that_exists(tmp_path, capsys):
    out = tmp_path / "sft"
    flags = ["lm", "sft", "--tiny_hidden_size", "32", "--tiny_layers", "1", "--tiny_heads", "2",
             "--tiny_intermediate_size", "64", "--train_examples", "16", "--eval_examples", "0", "--gen_length", "24",
             "--block_length", "24", "--steps", "4", "--batch_size", "4", "--warmup_steps", "0", "--max_steps", "20",
             "--save_every", "100", "--learning_rate", "1e12", "--max_grad_norm", "0", "--progress_bar", "false",
             "--output_dir", str(out)]
    assert cli_main(flags) == 1
    err = capsys.readouterr().err
    assert "non-finite SFT loss" in err and "no checkpoint was written yet" in err and "Traceback" not in err
    assert list_checkpoints(out) == []


def test_control_blames_the_policy_not_the_environment_when_it_diverges(tmp_path, capsys):
    code = cli_main(["control", "train", "--env", "Pendulum-v1", "--num_envs", "2", "--rollout_steps", "64",
                     "--epochs", "4", "--minibatches", "2", "--actor_hidden", "16", "--critic_hidden", "16",
                     "--sampling_steps", "2", "--num_draws", "4", "--knn_entropy_k", "3", "--learning_rate", "1e12",
                     "--lr_max", "1e13", "--total_steps", "1280", "--save_every", "1", "--progress", "false",
                     "--tensorboard", "false", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "the policy diverged" in err and "physics" not in err, err
    assert "--learning_rate" in err


# ------------------------------------------------------------------ TensorBoard and model folders

def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        for step in range(1, 6):  # the killed run got to step 5; its checkpoint was at step 2
            logger.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, tensorboard=True, resume_from_step=3) as logger:
        for step in range(3, 7):
            logger.log(step, {"loss": 10.0 + step})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in scalars] == [1.0, 2.0, 13.0, 14.0, 15.0, 16.0]


def test_a_resume_trims_the_killed_runs_completions_like_its_metrics(tmp_path):
    from dipod.lm.monitors import log_completions

    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in (2, 4, 6):  # evaluations of the killed run; its checkpoint was at step 4
            logger.log(step, {"loss": 1.0})
            log_completions(tmp_path / "completions.jsonl", step, ["p"], [f"c{step}"], [0.5], limit=1)
    MetricsLogger(tmp_path, tensorboard=False, resume_from_step=5).close()
    assert [r["step"] for r in read_metrics(tmp_path / "completions.jsonl")] == [2, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4]


def test_wandb_missing_is_refused_before_the_run_folder_is_touched(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match="--wandb_project needs wandb.*pip install wandb"):
        MetricsLogger(tmp_path / "run", tensorboard=False, wandb_project="p")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_outputs_get_the_users_umask_not_the_temp_files_0600(tmp_path):
    from dipod.lm.model import build_tiny_model
    from dipod.runlog import atomic_write_text

    before = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"s": 1}, {})
        build_tiny_model(tmp_path / "model", hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                         max_positions=8)  # a saved model (final_model, lm sft's model): the same atomic rename
    finally:
        os.umask(before)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    for folder in (tmp_path / "checkpoint-1", tmp_path / "model"):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir()), folder


def test_a_broken_config_json_is_named(tmp_path, tiny_model):
    import shutil

    from dipod.lm.model import load_masked_lm

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text('{"model_type": "modernbert",')
    with pytest.raises(ValueError, match=f"{broken / 'config.json'} is not valid JSON"):
        load_masked_lm(str(broken))
    (broken / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_masked_lm(str(broken))


def test_a_truncated_weights_file_is_one_message(tmp_path, tiny_model, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    flags = ["--model", str(broken), "--task", "sudoku4", "--eval_examples", "0", "--output_dir", str(tmp_path / "s")]
    assert cli_main(["lm", "sft", *flags]) == 2
    err = capsys.readouterr().err
    assert "a weights file cannot be read" in err and "truncated or damaged" in err and "Traceback" not in err
