"""The bad-input table of docs/results/bad_inputs.md, kept true: each row runs through the CLI and must
end with its exit status and one line holding its phrase, no traceback. Also Ctrl-C: exit 130 with
the command that continues the run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from dipod.checkpoint import save_checkpoint
from dipod.cli import main as cli_main
from dipod.lm.tasks import get_task

PAGE = Path(__file__).resolve().parents[1] / "docs" / "results" / "bad_inputs.md"


def _cases() -> list[tuple[str, int, str]]:
    text = PAGE.read_text()
    table = text[text.index("<!-- cases:"):text.index("<!-- end cases -->")]
    rows = [line.strip().strip("|").split("|") for line in table.splitlines()[3:] if line.startswith("|")]
    return [(command.strip().strip("`"), int(code), phrase.strip()) for command, code, phrase in rows]


@pytest.mark.parametrize("command,code,phrase", _cases(), ids=[c[0] for c in _cases()])
def test_a_bad_input_ends_with_one_clear_line(command, code, phrase, tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: tiny\nlearning_rate: 1.0e-5\nlearning_rate: 3.0e-4\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": s / 4}) + "\n" for s in range(3)))
    held = tmp_path / "held_out.csv"
    held.write_text("Puzzle,Solution\n" + "".join(f"{ex['puzzle']},{ex['solution']}\n"
                                                  for ex in get_task("sudoku4").load("test", limit=4)))
    lmrun = tmp_path / "lmrun"
    save_checkpoint(lmrun, 1, {"w": torch.zeros(2)}, {}, {"config": {"model": "tiny", "task": "sudoku4"}})
    sftrun = tmp_path / "sftrun"
    sftrun.mkdir()
    (sftrun / "config.yaml").write_text("model: tiny\ntask: sudoku4\nbatch_size: 4\n")
    (sftrun / "sft_result.json").write_text("{}")
    argv = shlex.split(command.format(dup=dup, run=run, held=held, tmp=tmp_path, lmrun=lmrun, sftrun=sftrun))[1:]
    assert cli_main(argv) == code
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command,resume", [("lm sft", "--resume true"), ("lm train", "--resume latest")])
def test_ctrl_c_exits_130_with_the_resume_command(command, resume, monkeypatch, capsys):
    import importlib

    from dipod.cli import COMMANDS

    def interrupted(argv, prog):
        raise KeyboardInterrupt

    module = importlib.import_module(COMMANDS[tuple(command.split())][0])
    monkeypatch.setattr(module, "main", interrupted)
    flags = ["--output_dir", "runs/my run", "--resume", "--max_steps", "9"]
    assert cli_main([*command.split(), *flags]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"dipod {command}: interrupted; the checkpoints already written are kept, continue with: "
                   f"dipod {command} --output_dir 'runs/my run' --max_steps 9 {resume}")


def test_a_task_whose_package_is_missing_names_the_install(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    try:
        import Box2D  # noqa: F401
        pytest.skip("Box2D is installed here: CarRacing would start")
    except ImportError:
        pass
    assert cli_main(["control", "train", "--env", "CarRacing-v3", "--output_dir", str(tmp_path / "cr")]) == 2
    err = capsys.readouterr().err
    assert "CarRacing-v3 needs a package that is not installed" in err and "box2d" in err and "Traceback" not in err


@pytest.mark.parametrize("encoding,suffix", [("utf-16", ".jsonl"), ("latin-1", ".csv"), ("utf-16", ".json")])
def test_a_data_file_that_is_not_utf8_is_named(encoding, suffix, tmp_path):
    from dipod.lm.tasks.data_files import read_csv, read_records

    path = tmp_path / f"data{suffix}"
    text = {".jsonl": '{"question": "caf\u00e9?", "answer": "#### 1"}\n', ".csv": "Puzzle,Solution\ncaf\u00e9,1\n",
            ".json": '[{"question": "caf\u00e9?"}]'}[suffix]
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=rf"^{path} is not UTF-8 text \(.*\); save it as UTF-8$"):
        list(read_csv(path, ("Puzzle", "Solution")) if suffix == ".csv" else read_records(str(path), "test"))
