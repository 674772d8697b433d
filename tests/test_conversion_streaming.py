"""
The converter's read/write path streams: inputs are memory-mapped and unmapped after each output shard, and each
shard is written one tensor at a time, so peak memory does not grow with the model (measured at full 7B size by
`minigpt4_hf/benchmark_conversion.py`, see docs/variants-conversion-and-training.md).
"""

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from minigpt4_hf.cli.convert import main as convert_main
from minigpt4_hf.conversion import write_safetensors_file
from safetensors import safe_open
from safetensors.torch import load_file

from test_convert import INPUTS, fixture_argv


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a.float32": torch.randn(3, 5),
        "b.float16": torch.randn(7).half(),
        "c.bfloat16": torch.randn(2, 2, 3).bfloat16(),
        "d.int64": torch.arange(5),
        "e.empty": torch.zeros(0, 4),
    }
    entries = [(name, tuple(value.shape), value.dtype, lambda value=value: value) for name, value in tensors.items()]
    write_safetensors_file(tmp_path / "x.safetensors", entries, metadata={"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype for name, value in tensors.items())
    with safe_open(tmp_path / "x.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_each_tensor_is_dropped_before_the_next_is_produced(tmp_path):
    produced: list[weakref.ref] = []
    alive_when_produced = []

    def produce() -> torch.Tensor:
        gc.collect()
        alive_when_produced.append(sum(ref() is not None for ref in produced))
        tensor = torch.randn(256, 256)
        produced.append(weakref.ref(tensor))
        return tensor

    entries = [(f"t{i}", (256, 256), torch.float32, produce) for i in range(4)]
    write_safetensors_file(tmp_path / "x.safetensors", entries)
    assert alive_when_produced == [0, 0, 0, 0]


def test_a_tensor_other_than_announced_is_an_error(tmp_path):
    entries = [("t", (2, 3), torch.float16, lambda: torch.zeros(3, 2, dtype=torch.float16))]
    with pytest.raises(RuntimeError, match=r"t: announced \[2, 3\] torch.float16, produced \[3, 2\]"):
        write_safetensors_file(tmp_path / "x.safetensors", entries)


def mapped_paths() -> set[str]:
    """The files this process has memory-mapped now (Linux /proc)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_inputs_are_unmapped_between_output_shards(tmp_path, monkeypatch):
    import minigpt4_hf.conversion as conversion

    inputs = {str(Path(INPUTS[flag]).resolve()) for flag in ("--vit-checkpoint", "--qformer-checkpoint",
                                                              "--projection-checkpoint")}
    inputs.add(str((Path(INPUTS["--llm"]) / "pytorch_model.bin").resolve()))
    mapped_at_shard_start = []
    write = conversion.write_safetensors_file

    def watching_write(path, entries, metadata=None):
        gc.collect()
        mapped_at_shard_start.append(mapped_paths() & inputs)
        write(path, entries, metadata)

    monkeypatch.setattr(conversion, "write_safetensors_file", watching_write)
    output_dir = tmp_path / "out"
    assert convert_main(fixture_argv(output_dir, extra=("--max-shard-size", "100KB"))) == 0
    index = json.loads((output_dir / "model.safetensors.index.json").read_text())
    assert len(mapped_at_shard_start) == len(set(index["weight_map"].values())) > 3
    assert mapped_at_shard_start == [set()] * len(mapped_at_shard_start)
