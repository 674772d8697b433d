"""
minigpt4-benchmark-conversion: random original-format inputs made once, one conversion measured in a child process
against the bound 2 x --max-shard-size + 2 GB. The full-size (7B, ~16 GB) run is not part of the tests; these run the
same code on the tiny set.
"""

import json

import pytest
import torch
from minigpt4_hf.benchmark_conversion import SIZES, make_inputs, qformer_shapes, vit_shapes
from minigpt4_hf.cli.benchmark_conversion import main as benchmark_main


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "inputs"
    return folder, make_inputs(folder, "tiny")


def test_inputs_have_the_original_key_sets_and_shapes(tiny_inputs):
    _, paths = tiny_inputs
    vit = torch.load(paths["--vit-checkpoint"], weights_only=True)
    assert {key: tuple(value.shape) for key, value in vit.items()} == vit_shapes(SIZES["tiny"])
    assert {value.dtype for value in vit.values()} == {torch.float16}
    qformer = torch.load(paths["--qformer-checkpoint"], weights_only=True)["model"]
    assert {key: tuple(value.shape) for key, value in qformer.items()} == qformer_shapes(SIZES["tiny"])
    assert (paths["--llm"] / "model.safetensors.index.json").is_file()


def test_inputs_are_made_once_and_reused(tiny_inputs):
    folder, paths = tiny_inputs
    before = paths["--vit-checkpoint"].stat().st_mtime_ns
    assert make_inputs(folder, "tiny") == paths
    assert paths["--vit-checkpoint"].stat().st_mtime_ns == before


def test_benchmark_prints_peak_rss_against_the_bound_and_removes_the_output(tiny_inputs, tmp_path, capsys):
    folder, _ = tiny_inputs
    report = tmp_path / "result.json"
    assert benchmark_main(["--inputs-dir", str(folder), "--size", "tiny", "--max-shard-size", "1GB",
                           "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "| peak / bound |" in table and "| bound (2 x max-shard-size + 2 GB) | 4.00 GB |" in table
    result = json.loads(report.read_text())
    assert result["bound_bytes"] == 4 * 10**9
    assert 0 < result["peak_rss_bytes"] and result["ratio"] == result["peak_rss_bytes"] / result["bound_bytes"]
    assert result["output_bytes"] > 0 and result["input_bytes"] > 0
    assert not (folder.parent / f"{folder.name}-converted").exists()
    assert folder.is_dir()


def test_bad_shard_size_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(["--inputs-dir", str(tmp_path), "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err


def test_size_choices_of_the_command_line_are_the_input_sets():
    from minigpt4_hf.benchmark_conversion import SIZES
    from minigpt4_hf.cli.benchmark_conversion import SIZE_CHOICES

    assert sorted(SIZE_CHOICES) == sorted(SIZES)
