"""minigpt4_hf.files: outputs are written whole or not at all, with the modes of any new file or folder."""

import os
import stat

import pytest

from minigpt4_hf.files import atomic_path, write_text_atomically


def default_mode(is_dir: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def test_a_file_appears_whole_with_the_usual_mode(tmp_path):
    write_text_atomically(tmp_path / "out" / "result.json", "{}\n")
    assert (tmp_path / "out" / "result.json").read_text() == "{}\n"
    assert stat.S_IMODE((tmp_path / "out" / "result.json").stat().st_mode) == default_mode(False)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["result.json"]


def test_a_folder_replaces_the_previous_one_whole_with_the_usual_modes(tmp_path):
    destination = tmp_path / "model"
    destination.mkdir()
    (destination / "stale.txt").write_text("old")
    with atomic_path(destination, directory=True) as staging:
        (staging / "config.json").write_text("{}")
    assert [path.name for path in destination.iterdir()] == ["config.json"]
    assert stat.S_IMODE(destination.stat().st_mode) == default_mode(True)
    assert stat.S_IMODE((destination / "config.json").stat().st_mode) == default_mode(False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_an_error_while_writing_leaves_the_destination_as_it_was(tmp_path):
    destination = tmp_path / "model"
    destination.mkdir()
    (destination / "config.json").write_text("previous")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(destination, directory=True) as staging:
            (staging / "config.json").write_text("half")
            raise OSError("disk full")
    assert (destination / "config.json").read_text() == "previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_merge_replaces_same_named_entries_and_keeps_the_others(tmp_path):
    destination = tmp_path / "run"
    (destination / "checkpoint-2").mkdir(parents=True)
    (destination / "adapter").mkdir()
    (destination / "adapter" / "old.bin").write_text("old")
    with atomic_path(destination, directory=True, merge=True) as staging:
        (staging / "adapter").mkdir()
        (staging / "adapter" / "new.bin").write_text("new")
        (staging / "config.json").write_text("{}")
    assert sorted(path.name for path in destination.iterdir()) == ["adapter", "checkpoint-2", "config.json"]
    assert [path.name for path in (destination / "adapter").iterdir()] == ["new.bin"]
