import json

import pytest

from lexlora.errors import DataError
from lexlora.records import read_records

FIELDS = ["filename", "file_desc"]


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"filename": "backup_config", "file_desc": "It likely stores backup settings."}


def test_reads_jsonl_with_line_numbers(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, "", {**GOOD, "filename": "b", "extra": 1}]))
    records = read_records(path, FIELDS, "file_desc")
    assert [r.line for r in records] == [1, 3]
    assert records[1].fields == {"filename": "b", "file_desc": GOOD["file_desc"]}


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"filename": "a", "file_desc": "x"', r"d\.jsonl line 2: malformed JSON"),
        ({"file_desc": "x"}, r"d\.jsonl line 2: field 'filename' is missing"),
        ({"filename": None, "file_desc": "x"}, r"d\.jsonl line 2: field 'filename' is null"),
        ({"filename": 12, "file_desc": "x"}, r"d\.jsonl line 2: field 'filename' must be a string, got int"),
        ({"filename": "a", "file_desc": "   "}, r"d\.jsonl line 2: target field 'file_desc' is empty"),
        ('["not", "an", "object"]', r"d\.jsonl line 2: expected an object"),
    ],
)
def test_bad_jsonl_records_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, row, GOOD]))
    with pytest.raises(DataError, match=message):
        read_records(path, FIELDS, "file_desc")


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, "{broken", {"filename": 3, "file_desc": "x"}, GOOD]))
    records = read_records(path, FIELDS, "file_desc", skip_invalid=True)
    assert [r.line for r in records] == [1, 4]
    assert "skipped 2 invalid record(s)" in caplog.text


def test_all_problems_are_counted_in_one_error(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([{"filename": "a"}] * 15))
    with pytest.raises(DataError, match=r"15 invalid record\(s\)[\s\S]*and 5 more"):
        read_records(path, FIELDS, "file_desc")


def test_bom_crlf_and_bad_utf8(tmp_path):
    text = ("\ufeff" + json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode("utf-8")
    assert len(read_records(write(tmp_path, "ok.jsonl", text), FIELDS, "file_desc")) == 2
    bad = json.dumps(GOOD).encode() + b"\n" + b'{"filename": "\xff", "file_desc": "x"}\n'
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid UTF-8"):
        read_records(write(tmp_path, "bad.jsonl", bad), FIELDS, "file_desc")


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no valid records"):
        read_records(write(tmp_path, "e.jsonl", ""), FIELDS, "file_desc")
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.jsonl", FIELDS, "file_desc")


def test_json_array_keeps_line_numbers(tmp_path):
    text = "[\n" + json.dumps(GOOD) + ",\n" + json.dumps({"filename": "x"}) + "\n]\n"
    with pytest.raises(DataError, match=r"d\.json line 3: field 'file_desc' is missing"):
        read_records(write(tmp_path, "d.json", text), FIELDS, "file_desc")
    good = "[" + json.dumps(GOOD) + ", " + json.dumps(GOOD) + "]"
    assert len(read_records(write(tmp_path, "g.json", good), FIELDS, "file_desc")) == 2


def test_csv_keeps_strings_and_reports_missing_columns(tmp_path):
    path = write(tmp_path, "d.csv", "filename,file_desc\n123,A number-named file.\nb,\n")
    with pytest.raises(DataError, match=r"d\.csv line 3: target field 'file_desc' is empty"):
        read_records(path, FIELDS, "file_desc")
    records = read_records(path, FIELDS, "file_desc", skip_invalid=True)
    assert records[0].fields["filename"] == "123"
    with pytest.raises(DataError, match=r"column\(s\) 'file_desc' missing"):
        read_records(write(tmp_path, "m.csv", "filename\na\n"), FIELDS, "file_desc")


def test_saved_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {"filename": "b", "file_desc": ""}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds row 1: target field 'file_desc' is empty"):
        read_records(tmp_path / "ds", FIELDS, "file_desc")
    assert len(read_records(tmp_path / "ds", FIELDS, "file_desc", skip_invalid=True)) == 1
