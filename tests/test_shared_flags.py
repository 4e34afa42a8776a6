"""One meaning per flag across `dipod lm sft`, `dipod lm train` and `dipod control train`: `--resume`
alone = the newest intact checkpoint in the output folder, `--resume PATH` = that checkpoint (old
spellings latest / auto / true kept as aliases); the flags the three share are spelt alike."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dipod.checkpoint import RESUME_HELP, resume_checkpoint, save_checkpoint
from dipod.config import ConfigError, config_fields, parse_config
from dipod.control.config import ControlConfig
from dipod.lm.sft import SFTConfig
from dipod.lm.train_config import TrainConfig

COMMANDS = {SFTConfig: [], TrainConfig: ["--model", "org/name"], ControlConfig: []}
SHARED = ("output_dir", "seed", "resume", "overwrite", "keep_checkpoints", "tensorboard", "progress_bar")


@pytest.mark.parametrize("cls", list(COMMANDS))
def test_resume_has_one_meaning_in_every_training_command(cls):
    base = COMMANDS[cls]

    def resume(*flags: str):
        return parse_config(cls, [*base, *flags], "x").resume

    assert resume() is None and resume("--resume", "false") is None
    assert resume("--resume") == resume("--resume", "--seed", "3") == "latest"
    assert resume("--resume", "latest") == resume("--resume", "auto") == resume("--resume", "TRUE") == "latest"
    assert resume("--resume", "runs/x/checkpoint-4") == "runs/x/checkpoint-4"
    assert config_fields(cls)["resume"].metadata["help"] == RESUME_HELP
    assert cls(**({"model": "org/name"} if cls is TrainConfig else {}), resume=True).resume == "latest"


def test_the_shared_flags_are_spelt_alike():
    for name in SHARED:
        assert all(name in config_fields(cls) for cls in COMMANDS), name


def test_control_keeps_its_old_progress_spelling_as_an_alias(tmp_path):
    assert parse_config(ControlConfig, ["--progress", "false"], "x").progress_bar is False
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("progress: false\n")
    assert parse_config(ControlConfig, ["--config", str(yaml_file)], "x").progress_bar is False
    assert parse_config(ControlConfig, ["--config", str(yaml_file), "--progress_bar", "true"], "x").progress_bar
    yaml_file.write_text("progress: false\nprogress_bar: true\n")
    with pytest.raises(ConfigError, match="sets both 'progress' and 'progress_bar'"):
        parse_config(ControlConfig, ["--config", str(yaml_file)], "x")


def test_resume_finds_the_newest_checkpoint_or_the_named_one(tmp_path):
    assert resume_checkpoint(tmp_path, None) is None
    assert resume_checkpoint(tmp_path, "latest") is None  # nothing yet: a fresh start
    weights = {"w": torch.ones(2)}
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"w": weights["w"] * step}, {"s": step}, {}, keep_last=3)
    path, (loaded, state, meta) = resume_checkpoint(tmp_path, "latest")
    assert path.name == "checkpoint-4" and meta["step"] == 4 and torch.equal(loaded["w"], torch.full((2,), 4.0))
    path, (loaded, state, meta) = resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-2"))
    assert meta["step"] == 2 and state == {"s": 2}
    with pytest.raises(FileNotFoundError, match="--resume .*not a checkpoint folder"):
        resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-3"))


def test_a_bare_resume_in_control_continues_the_newest_checkpoint(tmp_path):
    from dipod.control.runner import resolve_resume

    cfg = ControlConfig(output_dir=str(tmp_path), resume=True)
    assert resolve_resume(cfg) is None
    save_checkpoint(tmp_path, 256, {"w": torch.zeros(1)}, {}, {}, keep_last=2)
    assert resolve_resume(cfg) == tmp_path / "checkpoint-256"
    assert resolve_resume(dataclasses.replace(cfg, resume=str(tmp_path / "checkpoint-256"))).name == "checkpoint-256"
