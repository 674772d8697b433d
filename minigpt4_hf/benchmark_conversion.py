"""
Peak memory of converting a full-size checkpoint set with `minigpt4-convert`, against the bound it promises:
`2 x --max-shard-size + 2 GB`, whatever the model size.

`make_inputs` writes random files with the names, key sets, shapes and dtypes of the released MiniGPT-4 7B inputs,
once, into a folder that later runs reuse:

- `eva_vit_g.pth`: the EVA ViT-g, 40 blocks of width 1408, float16 (about 2 GB);
- `blip2_pretrained_flant5xxl.pth`: `{"model": {ln_vision, query_tokens, Qformer.bert.*, t5_proj}}`, float32;
- `vicuna-7b-v0/`: a LLaMA-7B with Vicuna v0's 32001-token vocabulary in two safetensors shards, float16 (13.5 GB),
  with its config and a tokenizer of that size;
- `prerained_minigpt4_7b.pth`: the projection `llama_proj` 768 -> 4096 (the original's file name, typo included).

`measure_conversion` then runs the converter on them in a child process, which writes its own peak resident set size
(VmHWM of /proc/self/status, what `/usr/bin/time -v` reports as "Maximum resident set size") when it exits. (The
`ru_maxrss` of a child would not do: Linux starts it at the parent's size when it forks.) Sizes are in decimal units,
as `--max-shard-size` parses them (1 GB = 10**9 bytes).
"""

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from tokenizers import Tokenizer, models
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minigpt4_hf.conversion import write_safetensors_file
from minigpt4_hf.files import atomic_path


GB = 10**9
BOUND_SLACK_BYTES = 2 * GB  # the "+ 2 GB" of the bound: the Python process, torch, one layer's tensors


@dataclass(frozen=True)
class InputSizes:
    """Shapes of one set of original-format inputs."""

    vit_width: int
    vit_blocks: int
    vit_mlp: int
    patch: int
    grid: int
    qformer_width: int
    qformer_layers: int
    qformer_mlp: int
    queries: int
    t5_width: int
    llm: dict
    vocab_size: int
    llm_shard_size: str


SIZES = {
    # The released MiniGPT-4 7B set (facts: eva_vit_g.pth has 40 blocks, MiniGPT-4 uses 39; Vicuna v0 has 32001
    # tokens); LLaMA folders converted by transformers come in ~10 GB shards.
    "7b": InputSizes(
        vit_width=1408, vit_blocks=40, vit_mlp=6144, patch=14, grid=16,
        qformer_width=768, qformer_layers=12, qformer_mlp=3072, queries=32, t5_width=4096,
        llm={"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
        vocab_size=32001, llm_shard_size="10GB",
    ),
    # A quick check of the machinery (widths divisible by the default head counts, so no overrides are needed).
    "tiny": InputSizes(
        vit_width=64, vit_blocks=3, vit_mlp=128, patch=14, grid=4,
        qformer_width=96, qformer_layers=2, qformer_mlp=192, queries=4, t5_width=32,
        llm={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        vocab_size=1001, llm_shard_size="200KB",
    ),
}
FILE_NAMES = {
    "--vit-checkpoint": "eva_vit_g.pth",
    "--qformer-checkpoint": "blip2_pretrained_flant5xxl.pth",
    "--llm": "vicuna-7b-v0",
    "--projection-checkpoint": "prerained_minigpt4_7b.pth",
}
MARKER = "inputs.json"


# ---------------------------------------------------------------------------------------------------------------------
# Key sets and shapes of the original files.


def vit_shapes(sizes: InputSizes) -> dict[str, tuple[int, ...]]:
    """`eva_vit_g.pth`: bare keys `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.*`."""
    width, mlp = sizes.vit_width, sizes.vit_mlp
    shapes = {
        "cls_token": (1, 1, width), "pos_embed": (1, sizes.grid**2 + 1, width),
        "patch_embed.proj.weight": (width, 3, sizes.patch, sizes.patch), "patch_embed.proj.bias": (width,),
    }
    for i in range(sizes.vit_blocks):
        block = f"blocks.{i}."
        shapes.update({
            block + "norm1.weight": (width,), block + "norm1.bias": (width,),
            block + "attn.q_bias": (width,), block + "attn.v_bias": (width,), block + "attn.qkv.weight": (3 * width, width),
            block + "attn.proj.weight": (width, width), block + "attn.proj.bias": (width,),
            block + "norm2.weight": (width,), block + "norm2.bias": (width,),
            block + "mlp.fc1.weight": (mlp, width), block + "mlp.fc1.bias": (mlp,),
            block + "mlp.fc2.weight": (width, mlp), block + "mlp.fc2.bias": (width,),
        })
    return shapes


# The one integer tensor of the BLIP-2 file (a buffer of the Q-Former's unused text embeddings).
QFORMER_POSITION_IDS = "Qformer.bert.embeddings.position_ids"


def qformer_shapes(sizes: InputSizes) -> dict[str, tuple[int, ...]]:
    """
    `blip2_pretrained_flant5xxl.pth["model"]`: `ln_vision`, `query_tokens`, `Qformer.bert.*` (`QFORMER_POSITION_IDS`
    int64, the rest float32), `t5_proj`.
    """
    width, vision = sizes.qformer_width, sizes.vit_width
    shapes = {
        "query_tokens": (1, sizes.queries, width), "ln_vision.weight": (vision,), "ln_vision.bias": (vision,),
        QFORMER_POSITION_IDS: (1, 512),
        "Qformer.bert.embeddings.LayerNorm.weight": (width,), "Qformer.bert.embeddings.LayerNorm.bias": (width,),
        "t5_proj.weight": (sizes.t5_width, width), "t5_proj.bias": (sizes.t5_width,),
    }
    for i in range(sizes.qformer_layers):
        layer = f"Qformer.bert.encoder.layer.{i}."
        for block in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            for projection in ("query", "key", "value"):
                in_width = vision if block == "crossattention" and projection != "query" else width
                shapes[f"{layer}{block}.self.{projection}.weight"] = (width, in_width)
                shapes[f"{layer}{block}.self.{projection}.bias"] = (width,)
            shapes.update({
                f"{layer}{block}.output.dense.weight": (width, width), f"{layer}{block}.output.dense.bias": (width,),
                f"{layer}{block}.output.LayerNorm.weight": (width,), f"{layer}{block}.output.LayerNorm.bias": (width,),
            })
        shapes.update({
            layer + "intermediate_query.dense.weight": (sizes.qformer_mlp, width),
            layer + "intermediate_query.dense.bias": (sizes.qformer_mlp,),
            layer + "output_query.dense.weight": (width, sizes.qformer_mlp), layer + "output_query.dense.bias": (width,),
            layer + "output_query.LayerNorm.weight": (width,), layer + "output_query.LayerNorm.bias": (width,),
        })
    return shapes


def llama_config(sizes: InputSizes) -> LlamaConfig:
    return LlamaConfig(vocab_size=sizes.vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, **sizes.llm)


def llama_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The LLaMA checkpoint's keys and shapes (the model built on the meta device)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def synthetic_llama_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """
    A LLaMA-like tokenizer of `vocab_size` tokens (`<unk>` 0, `<s>` 1, `</s>` 2, made-up pieces, the pieces of `###`,
    and Vicuna v0's added `[PAD]` last), for inputs whose embedding has that many rows.
    """
    pieces = ["<unk>", "<s>", "</s>", "▁", "#", "##", "###", "▁#", "▁###"]
    pieces += [f"▁w{index}" for index in range(vocab_size - 1 - len(pieces))]
    backend = Tokenizer(models.Unigram([(piece, -1.0) for piece in pieces], unk_id=0, byte_fallback=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Writing the inputs.


class RandomPool:
    """Random values for large tensors, fast: consecutive slices of one pool of normal(0, 0.02) samples."""

    def __init__(self, size: int = 1 << 26, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(size, generator=generator) * 0.02
        self.offset = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        out = torch.empty(count, dtype=dtype)
        filled = 0
        while filled < count:
            step = min(count - filled, self.pool.numel() - self.offset)
            out[filled : filled + step] = self.pool[self.offset : self.offset + step]
            filled += step
            self.offset = (self.offset + step + 7919) % self.pool.numel()  # 7919: no two tensors start alike
        return out.view(shape)


def write_llama_folder(folder: Path, sizes: InputSizes, pool: RandomPool) -> None:
    """config.json, tokenizer and float16 safetensors shards (+ index) of a random LLaMA, one tensor in memory."""
    folder.mkdir()
    config = llama_config(sizes)
    config.save_pretrained(folder)
    synthetic_llama_tokenizer(sizes.vocab_size).save_pretrained(folder)
    shapes = llama_shapes(config)
    metas = {key: torch.empty(shape, dtype=torch.float16, device="meta") for key, shape in shapes.items()}
    split = split_torch_state_dict_into_shards(metas, max_shard_size=sizes.llm_shard_size)
    for filename, keys in tqdm(split.filename_to_tensors.items(), desc="LLaMA shards", disable=None):
        entries = [(key, shapes[key], torch.float16, lambda key=key: pool.take(shapes[key], torch.float16))
                   for key in keys]
        write_safetensors_file(folder / filename, entries, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_inputs(folder: str | os.PathLike, size: str = "7b") -> dict[str, Path]:
    """
    The original-format input files of `size` in `folder`, written once (atomically: the folder appears complete or
    not at all) and reused when they are there. Returns `{converter flag: path}`.
    """
    folder = Path(folder)
    paths = {flag: folder / name for flag, name in FILE_NAMES.items()}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("size") == size:
        return paths
    if folder.exists():
        raise FileExistsError(f"{folder} exists but holds no '{size}' inputs ({MARKER}); remove it or pick another.")
    sizes = SIZES[size]
    pool = RandomPool()
    with atomic_path(folder, directory=True) as staging:
        vit = {key: pool.take(shape, torch.float16) for key, shape in vit_shapes(sizes).items()}
        torch.save(vit, staging / FILE_NAMES["--vit-checkpoint"])
        del vit
        qformer = {key: pool.take(shape, torch.float32) for key, shape in qformer_shapes(sizes).items()}
        qformer[QFORMER_POSITION_IDS] = torch.arange(512)[None]
        torch.save({"model": qformer}, staging / FILE_NAMES["--qformer-checkpoint"])
        del qformer
        text_width = sizes.llm["hidden_size"]
        projection = {"llama_proj.weight": pool.take((text_width, sizes.qformer_width), torch.float32),
                      "llama_proj.bias": pool.take((text_width,), torch.float32)}
        torch.save({"model": projection}, staging / FILE_NAMES["--projection-checkpoint"])
        write_llama_folder(staging / FILE_NAMES["--llm"], sizes, pool)
        (staging / MARKER).write_text(json.dumps({"size": size, "sizes": asdict(sizes)}, indent=2))
    return paths


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


# ---------------------------------------------------------------------------------------------------------------------
# Measuring.


@dataclass
class ConversionMeasurement:
    size: str
    max_shard_size: str
    input_bytes: int
    output_bytes: int
    peak_rss_bytes: int  # of the converting process (VmHWM)
    import_rss_bytes: int  # of a process that only imports the converter
    bound_bytes: int  # 2 x max_shard_size + 2 GB
    wall_seconds: float

    @property
    def ratio(self) -> float:
        return self.peak_rss_bytes / self.bound_bytes

    def table(self) -> str:
        rows = [
            ("inputs", f"{self.size} set, {self.input_bytes / GB:.2f} GB on disk"),
            ("--max-shard-size", self.max_shard_size),
            ("converted folder", f"{self.output_bytes / GB:.2f} GB"),
            ("wall time", f"{self.wall_seconds:.0f} s"),
            ("peak RSS of the conversion", f"{self.peak_rss_bytes / GB:.2f} GB"),
            ("peak RSS of the imports alone", f"{self.import_rss_bytes / GB:.2f} GB"),
            ("bound (2 x max-shard-size + 2 GB)", f"{self.bound_bytes / GB:.2f} GB"),
            ("peak / bound", f"{self.ratio:.2f}"),
        ]
        return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM (Linux), else `ru_maxrss` (macOS reports bytes, Linux KiB)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _run_measured(code: str, peak_file: Path, log) -> int:
    """Runs `code` in a child Python that writes its peak RSS into `peak_file` at exit; returns its exit status."""
    prologue = (
        "import atexit, pathlib\n"
        "from minigpt4_hf.benchmark_conversion import peak_rss_bytes\n"
        f"atexit.register(lambda: pathlib.Path({str(peak_file)!r}).write_text(str(peak_rss_bytes())))\n"
    )
    return subprocess.run([sys.executable, "-c", prologue + code], stdout=log, stderr=subprocess.STDOUT).returncode


def measure_conversion(inputs: dict[str, Path], output_dir: Path, max_shard_size: str, size: str,
                       log_path: Path | None = None) -> ConversionMeasurement:
    """
    Runs `minigpt4_hf.cli.convert` on `inputs` in a child process and returns its peak RSS against the bound. A
    child that only imports the converter runs first, for the fixed cost of the process.
    """
    argv = ["--output-dir", str(output_dir), "--max-shard-size", max_shard_size, "--dtype", "float16"]
    for flag, path in inputs.items():
        argv += [flag, str(path)]
    with tempfile.TemporaryDirectory() as scratch, open(log_path or os.devnull, "w", encoding="utf-8") as log:
        import_peak, convert_peak = Path(scratch) / "import", Path(scratch) / "convert"
        _run_measured("import minigpt4_hf.cli.convert", import_peak, log)
        start = time.perf_counter()
        status = _run_measured(f"import sys\nfrom minigpt4_hf.cli.convert import main\nsys.exit(main({argv!r}))",
                               convert_peak, log)
        wall = time.perf_counter() - start
        if status != 0:
            raise RuntimeError(f"The conversion failed (exit {status}); see {log_path or 'its output'}.")
        import_rss, peak_rss = int(import_peak.read_text()), int(convert_peak.read_text())
    return ConversionMeasurement(
        size=size,
        max_shard_size=max_shard_size,
        input_bytes=sum(folder_bytes(path) if path.is_dir() else path.stat().st_size for path in inputs.values()),
        output_bytes=folder_bytes(output_dir),
        peak_rss_bytes=peak_rss,
        import_rss_bytes=import_rss,
        bound_bytes=2 * parse_size_to_int(max_shard_size) + BOUND_SLACK_BYTES,
        wall_seconds=wall,
    )


def run(inputs_dir: Path, size: str, max_shard_size: str, keep_output: bool = False,
        delete_inputs: bool = False) -> ConversionMeasurement:
    """Makes (or reuses) the inputs, measures one conversion, removes its output (and the inputs if asked)."""
    inputs = make_inputs(inputs_dir, size)
    output_dir = inputs_dir.parent / f"{inputs_dir.name}-converted"
    if output_dir.exists():
        shutil.rmtree(output_dir)
    try:
        measurement = measure_conversion(inputs, output_dir, max_shard_size, size,
                                         log_path=inputs_dir.parent / f"{inputs_dir.name}-convert.log")
    finally:
        if not keep_output:
            shutil.rmtree(output_dir, ignore_errors=True)
        if delete_inputs:
            shutil.rmtree(inputs_dir, ignore_errors=True)
    return measurement
