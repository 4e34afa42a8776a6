"""The evaluation sets shipped in the package match their recorded provenance (bytes and rows), the
paper's splits load by name from a bare install, and the data-file readers read what users write
(a byte-order mark, blank lines, wrapped JSON lists) and refuse the rest in one line naming the file."""

import hashlib
import json

import pytest

from dipod.lm.tasks import get_task
from dipod.lm.tasks.data_files import (PACKAGED_DATA, SHARED_DATA_ENV, data_file, read_csv, read_records,
                                       require_fields)

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


def test_a_named_file_missing_says_where_it_looked_and_how_to_point_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as refused:
        data_file("nothing.jsonl")
    assert str(refused.value) == (
        f"evaluation file nothing.jsonl not found in {tmp_path} ({SHARED_DATA_ENV}={tmp_path}); unset "
        f"{SHARED_DATA_ENV} to use the packaged copy, point it at a folder holding nothing.jsonl, or pass the "
        "file with path=...")
    monkeypatch.delenv(SHARED_DATA_ENV)
    with pytest.raises(FileNotFoundError) as refused:
        data_file("nothing.jsonl")
    assert f"not found in {PACKAGED_DATA} (the installed package (a broken install?)); unset" in str(refused.value)


def test_files_saved_with_a_byte_order_mark_read_like_plain_utf8(tmp_path):
    jsonl, json_file, csv_file = tmp_path / "a.jsonl", tmp_path / "a.json", tmp_path / "a.csv"
    jsonl.write_text('{"q": "é"}\n', encoding="utf-8-sig")
    json_file.write_text('[{"q": "é"}]', encoding="utf-8-sig")
    csv_file.write_text("Puzzle,solution\n0123,1234\n", encoding="utf-8-sig")
    assert [row for _, row in read_records(str(jsonl), "test")] == [{"q": "é"}]
    assert [row for _, row in read_records(str(json_file), "test")] == [{"q": "é"}]
    assert list(read_csv(csv_file, ("puzzle", "solution"))) == [(2, {"puzzle": "0123", "solution": "1234"})]


def test_csv_rows_skip_blank_lines_anywhere_and_keep_a_quoted_line_break(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'puzzle,solution\r\n1,2\r\n\r\n,,\r\n"3\r\n4",5\r\n6,7\r\n')
    rows = list(read_csv(path, ("puzzle", "solution")))
    assert [row for _, row in rows] == [{"puzzle": "1", "solution": "2"}, {"puzzle": "3\r\n4", "solution": "5"},
                                        {"puzzle": "6", "solution": "7"}]


def test_a_json_list_wrapped_in_one_key_is_unwrapped_and_nothing_else_is(tmp_path):
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": [{"x": 1}, {"x": 2}]}))
    assert list(read_records(str(wrapped), "test")) == [(f"{wrapped} item 0", {"x": 1}), (f"{wrapped} item 1", {"x": 2})]
    two_keys = tmp_path / "t.json"
    two_keys.write_text(json.dumps({"data": [{"x": 1}], "meta": 1}))
    with pytest.raises(ValueError) as refused:
        list(read_records(str(two_keys), "test"))
    assert str(refused.value) == f"{two_keys}: expected a JSON list of objects"


@pytest.fixture
def no_hub(monkeypatch):
    import datasets

    def contacted(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(datasets, "load_dataset", contacted)


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", "[1, 2]\n", "{path}:1: expected a JSON object, got list"),
    ("a.json", "[{}, 3]", "{path} item 1: expected a JSON object, got int"),
    ("a.json", "7", "{path}: expected a JSON list of objects"),
    ("a.txt", "x", "{path}: unsupported data file type; use one of .json, .jsonl, .parquet"),
    ("a.csv", "", "{path}: empty file; expected a header with columns puzzle, solution"),
    ("a.csv", "id,Puzzle\n1,2\n", "{path}:1: missing column(s) solution; header is id,Puzzle"),
    ("b.csv", "id,x\n1,2\n", "{path}:1: missing column(s) puzzle, solution; header is id,x"),
])
def test_each_bad_file_is_one_message_naming_it(tmp_path, no_hub, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as refused:
        rows = read_csv(path, ("puzzle", "solution")) if name.endswith(".csv") else read_records(str(path), "test")
        list(rows)
    assert str(refused.value) == message.format(path=path)


@pytest.mark.parametrize("path", ["missing.jsonl", "no such file", "/abs/missing"])
def test_a_path_that_is_neither_a_file_nor_a_hub_id_never_reaches_the_hub(no_hub, path):
    with pytest.raises(FileNotFoundError) as refused:
        list(read_records(path, "test"))
    assert str(refused.value) == f"data file {path} not found (and it is not a hub dataset id)"


def test_missing_fields_are_named_beside_the_fields_found():
    with pytest.raises(ValueError) as refused:
        require_fields({"a": 1, "b": None, "c": 2}, ("a", "b", "d"), "f.jsonl:3")
    assert str(refused.value) == "f.jsonl:3: missing field(s) b, d; found a, b, c"
