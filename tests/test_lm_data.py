"""The evaluation sets shipped in the package match their recorded provenance (bytes and rows), and
the paper's splits load by name from a bare install."""

import hashlib
import json

import pytest

from dipod.lm.tasks import get_task
from dipod.lm.tasks.data_files import PACKAGED_DATA, SHARED_DATA_ENV, data_file

PROVENANCE = json.loads((PACKAGED_DATA / "provenance.json").read_text())


@pytest.mark.parametrize("filename", sorted(PROVENANCE))
def test_each_shipped_file_has_the_recorded_checksum_rows_and_licence(filename):
    record = PROVENANCE[filename]
    data = (PACKAGED_DATA / filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"]
    task_name, split = record["split"].split()
    assert len(get_task(task_name).load(split)) == record["rows"]
    assert record["licence"] and record["source"]


def test_every_file_split_of_every_task_is_shipped():
    named = {name for task in ("sudoku4", "countdown") for name in get_task(task).file_splits.values()}
    assert named | {"gsm8k_test.jsonl", "math500_test.jsonl"} == set(PROVENANCE)


def test_the_environment_variable_overrides_the_packaged_copy(tmp_path, monkeypatch):
    (tmp_path / "countdown_cd3_test.jsonl").write_text('{"input": "1,2", "output": "3"}\n')
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert data_file("countdown_cd3_test.jsonl") == tmp_path / "countdown_cd3_test.jsonl"
    assert get_task("countdown").load("d1_test") == [{"numbers": [1, 2], "target": 3}]
    monkeypatch.delenv(SHARED_DATA_ENV)
    assert data_file("countdown_cd3_test.jsonl").parent == PACKAGED_DATA
