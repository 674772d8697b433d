"""minigpt4_hf.journal: the JSON-lines journal that lets captioning and the stage-2 builder resume."""

import json

import pytest

from minigpt4_hf.journal import Journal


def test_a_last_line_cut_short_is_removed_and_the_rest_kept(tmp_path):
    path = tmp_path / "describe.jsonl"
    path.write_text('{"image_id": "a", "status": "ok"}\n{"image_id": "b", "sta')
    journal = Journal(path)
    assert list(journal.records) == ["a"]
    journal.append({"image_id": "b", "status": "ok"})
    journal.close()
    assert [json.loads(line)["image_id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_a_broken_line_in_the_middle_is_refused_naming_it(tmp_path):
    path = tmp_path / "refine.jsonl"
    path.write_text('{"image_id": "a"}\nnot json\n{"image_id": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        Journal(path)


def test_the_last_record_of_an_item_counts(tmp_path):
    with Journal(tmp_path / "items.jsonl", key="id") as journal:
        journal.extend([{"id": "a", "status": "failed"}, {"id": "b", "status": "ok"}])
        journal.append({"id": "a", "status": "ok"})
    reopened = Journal(tmp_path / "items.jsonl", key="id")
    assert reopened.records == {"a": {"id": "a", "status": "ok"}, "b": {"id": "b", "status": "ok"}}
