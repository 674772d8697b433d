"""
What minigpt4-benchmark measures, and how: speed and memory of MiniGPT-4 against the plain way of running it.

Every comparison runs its variants side by side in one process, interleaved (one repeat of each variant in turn, the
order rotating), after warm-up runs, and reports the median and the 25th-75th percentile spread: a machine busy with
other work slows all variants alike instead of the one that happened to run last.

Cases (`run_benchmark`):
- image encoding: `get_image_features` the plain way (eager attention, fp32, no compilation) against SDPA, a compiled
  vision model and bf16 weights;
- prefill and decode: `generate()` with an image against the bare language model's `generate()` from a text prompt of
  the same length (greedy, a fixed number of new tokens, per-token clock);
- batched generation: tokens/s at several batch sizes;
- one training step (forward, backward, AdamW step): plain against no-grad frozen encoders, SDPA, bf16 autocast and
  bf16 frozen weights with the trained projection in fp32; gradient bytes per frozen/trained parameter;
- loading a saved checkpoint with `dtype=torch.bfloat16`: peak memory growth, in a fresh subprocess.
"""

import contextlib
import ctypes
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from minigpt4_hf.files import atomic_path, write_text_atomically
from minigpt4_hf.inference import load_model_and_processor
from minigpt4_hf.random_models import EXAMPLE_IMAGE, build_random_model

from modeling_minigpt4 import MiniGPT4ForConditionalGeneration
from processing_minigpt4 import MiniGPT4Processor, load_rgb_image

PROMPT = "<ImageHere> Describe this image in detail."
ANSWER = "A small picture of something on a table, lit from the left, with a plain wall behind it."
MB = 1024 * 1024

# The performance targets (docs/performance.md): name -> (comparison, goal); `value` comes from the measured cases.
TARGET_GOALS = {
    "decode_tokens_per_s_image_vs_text_lm": (">=", 0.97),
    "batch8_vs_batch1_generation_tokens_per_s": (">=", 3.0),
    "image_encoding_speedup_vs_plain": (">=", 1.25),
    "training_step_speedup_vs_plain": (">=", 1.25),
    "bf16_load_peak_rss_vs_bf16_weights": ("<=", 1.3),
    "bf16_load_of_fp32_checkpoint_peak_anon_vs_bf16_weights": ("<=", 1.3),
    "frozen_weight_gradient_bytes": ("==", 0),
}
# The variant each speed target compares with the plain one.
FAST_IMAGE_ENCODING = "bf16 + sdpa"
FAST_TRAINING_STEP = "bf16 frozen parts + sdpa + no_grad encoders"


# --------------------------------------------------------------------------------------------------------------------
# Statistics and timing.


def summarize(samples: list[float]) -> dict:
    """Median, 25th/75th percentiles, minimum and count of `samples`."""
    values = np.asarray(samples, dtype=float)
    return {
        "median": float(np.median(values)),
        "p25": float(np.percentile(values, 25)),
        "p75": float(np.percentile(values, 75)),
        "min": float(values.min()),
        "n": int(values.size),
    }


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that wall-clock times cover it (a no-op on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, desc: str = ""
) -> dict[str, list[float]]:
    """
    Times each variant `repeats` times, taking turns (the order rotates every round), after `warmup` untimed runs each.

    Returns:
        `{variant: [seconds, ...]}`.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for round_index in tqdm(range(repeats), desc=desc, leave=False, disable=not desc):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------------------------------
# Memory.


def process_memory() -> dict[str, int]:
    """This process's `VmRSS`, `VmHWM` (peak resident set), `RssAnon` and `RssFile`, in bytes (Linux; else `{}`)."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            lines = status.read().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in wanted:
            values[key] = int(value.split()[0]) * 1024
    return values


def release_free_heap() -> None:
    """Hands memory that glibc's malloc holds free back to the OS, so that the next peak counts reused memory too."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> bool:
    """Resets this process's peak resident set (`VmHWM`) to its current size; `False` where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """
    Peak memory growth over a block, in bytes (`.bytes`, `None` where it cannot be measured): the CUDA allocator's peak
    on GPUs, the peak resident set (Linux `VmHWM`, reset on entry) on CPUs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self._start = 0
        self._supported = False

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_heap()
            self._start = process_memory().get("VmRSS", 0)
            self._supported = bool(self._start) and reset_peak_rss()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._supported:
            self.bytes = max(0, process_memory()["VmHWM"] - self._start)


def peak_memory_of(function: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory growth (bytes) of one call of `function`."""
    with PeakMemory(device) as peak:
        function()
    return peak.bytes


def gradient_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held in `.grad` by trainable parameters and by frozen ones (`requires_grad=False`; should be 0)."""
    held = {"trainable": 0, "frozen": 0}
    for parameter in model.parameters():
        if parameter.grad is not None:
            kind = "trainable" if parameter.requires_grad else "frozen"
            held[kind] += parameter.grad.numel() * parameter.grad.element_size()
    return held


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# --------------------------------------------------------------------------------------------------------------------
# Ways of running the model.


@dataclass
class ModelSetup:
    """One way of running a model: attention implementation, compiled vision model, no-grad encoders, autocast."""

    model: MiniGPT4ForConditionalGeneration
    attention: str = "sdpa"
    compile_vision: bool = False
    frozen_encoders_without_grad: bool = True
    autocast_dtype: torch.dtype | None = None

    def apply(self) -> MiniGPT4ForConditionalGeneration:
        """Puts the model in this setup (variants may share one model: each applies its own before running)."""
        model = self.model
        model.set_attn_implementation(self.attention)
        model.model.frozen_encoders_without_grad = self.frozen_encoders_without_grad
        vision = model.vision_model
        if self.compile_vision:
            vision.forward = compiled_forward(vision)
        elif "forward" in vision.__dict__:
            del vision.forward
        return model

    @contextlib.contextmanager
    def applied(self) -> Iterator[MiniGPT4ForConditionalGeneration]:
        """`apply()`, and bf16 autocast around the block when the setup asks for it."""
        model = self.apply()
        if self.autocast_dtype is None:
            yield model
        else:
            with torch.autocast(model.device.type, dtype=self.autocast_dtype):
                yield model


_COMPILED_FORWARDS: dict[int, Callable] = {}


def compiled_forward(module: torch.nn.Module) -> Callable:
    """`torch.compile` of `module.forward`, made once per module (the first call compiles)."""
    if id(module) not in _COMPILED_FORWARDS:
        _COMPILED_FORWARDS[id(module)] = torch.compile(type(module).forward.__get__(module), dynamic=False)
    return _COMPILED_FORWARDS[id(module)]


def load_bf16_copy(
    model: MiniGPT4ForConditionalGeneration, processor: MiniGPT4Processor, folder: Path, device: torch.device
) -> MiniGPT4ForConditionalGeneration:
    """
    Saves `model`'s weights in bf16 (and the processor) to `folder` and loads them back on `device` with the tools'
    loader and `--dtype bfloat16` (memory-mapped: no second copy stays in memory).
    """
    state = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    processor.save_pretrained(folder)
    del state
    gc.collect()
    return load_model_and_processor(str(folder), device=str(device), dtype="bfloat16")[0]


# --------------------------------------------------------------------------------------------------------------------
# Generation.


class TokenClock(LogitsProcessor):
    """Notes the time of every generation step: `generate` runs logits processors once per new token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class GenerationRuns:
    """Timings of repeated `generate` calls of one variant."""

    batch_size: int
    new_tokens: int
    totals: list[float] = field(default_factory=list)  # seconds per call
    first_tokens: list[float] = field(default_factory=list)  # seconds to the first new token (prefill)
    steps: list[float] = field(default_factory=list)  # seconds between consecutive new tokens, all calls pooled

    def add(self, start: float, end: float, stamps: list[float]) -> None:
        self.totals.append(end - start)
        self.first_tokens.append(stamps[0] - start)
        self.steps.extend(later - earlier for earlier, later in itertools.pairwise(stamps))

    def summary(self) -> dict:
        """Prefill latency, decode tokens/s (from the median step) and end-to-end tokens/s (from the median call)."""
        step = summarize(self.steps)
        total = summarize(self.totals)
        return {
            "batch_size": self.batch_size,
            "new_tokens": self.new_tokens,
            "prefill_s": summarize(self.first_tokens),
            "decode_step_s": step,
            "decode_tokens_per_s": self.batch_size / step["median"],
            "total_s": total,
            "tokens_per_s": self.batch_size * self.new_tokens / total["median"],
        }


def fixed_length_generate_kwargs(model: MiniGPT4ForConditionalGeneration, new_tokens: int) -> dict:
    """Greedy, exactly `new_tokens` tokens: EOS is held back, and the turn-separator ids are suppressed in every
    variant so that the stop criterion runs (and costs) without ever stopping a row early."""
    stop_ids = sorted({token for sequence in model.config.stop_token_ids or [] for token in sequence})
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "suppress_tokens": stop_ids or None,
        "pad_token_id": model.config.text_config.pad_token_id,
    }


def compare_generation(
    variants: dict[str, Callable[[LogitsProcessorList], torch.LongTensor]],
    batch_sizes: dict[str, int],
    prompt_lengths: dict[str, int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    desc: str = "",
) -> dict[str, GenerationRuns]:
    """
    Runs `generate` variants in turns; each variant is called with a `LogitsProcessorList` holding a `TokenClock` and
    must return the `(batch_size, prompt_length + new_tokens)` ids (checked: no early stop).
    """
    runs = {name: GenerationRuns(batch_sizes[name], new_tokens) for name in variants}

    def once(name: str, record: bool) -> None:
        clock = TokenClock(device)
        synchronize(device)
        start = time.perf_counter()
        output = variants[name](LogitsProcessorList([clock]))
        synchronize(device)
        end = time.perf_counter()
        expected = (batch_sizes[name], prompt_lengths[name] + new_tokens)
        if tuple(output.shape) != expected:
            raise RuntimeError(f"{name}: generate returned shape {tuple(output.shape)}, expected {expected}.")
        if record:
            runs[name].add(start, end, clock.stamps)

    names = list(variants)
    for _ in range(warmup):
        for name in names:
            once(name, record=False)
    for round_index in tqdm(range(repeats), desc=desc, leave=False, disable=not desc):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            once(name, record=True)
    return runs


# --------------------------------------------------------------------------------------------------------------------
# Loading, measured in a fresh process.


def measure_loading(
    folder: Path, warmup_folder: Path, modules_cache: Path, repeats: int = 1, dtype: str = "bfloat16"
) -> dict:
    """
    Loads `folder` with `AutoModelForImageTextToText.from_pretrained(folder, dtype=..., trust_remote_code=True)`
    `repeats` times in a fresh Python process and reports, per load, its peak memory growth: `peak_rss_bytes` (peak
    resident set, mapped checkpoint pages included) and `peak_anon_bytes` (peak anonymous memory, sampled every
    millisecond: what the load allocates), its `seconds`, and the loaded `weight_bytes` and `dtypes`. The child first
    loads `warmup_folder` (imports, remote-code modules); each load then reads every weight once, so that
    memory-mapped weights count as resident.
    """
    request = {"folder": str(folder), "warmup_folder": str(warmup_folder), "dtype": dtype, "repeats": repeats}
    environment = dict(os.environ, HF_MODULES_CACHE=str(modules_cache), TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [sys.executable, "-m", "minigpt4_hf.benchmark", "--loading-child", json.dumps(request)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"The loading subprocess failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1])


def _loading_child(request: dict) -> dict:
    """Body of the loading subprocess (see `measure_loading`)."""
    from transformers import AutoModelForImageTextToText

    dtype = getattr(torch, request["dtype"])

    def load_and_touch(folder: str) -> torch.nn.Module:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, trust_remote_code=True)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.sum()  # pages a memory-mapped weight in
        return model

    load_and_touch(request["warmup_folder"])  # dropped right away: imports and remote-code modules stay warm
    measured = {"peak_rss_bytes": [], "peak_anon_bytes": [], "seconds": []}
    for _ in range(request["repeats"]):
        gc.collect()
        release_free_heap()
        peak_anon = [0]
        done = threading.Event()

        def sample_anonymous_memory(peak_anon: list[int] = peak_anon, done: threading.Event = done) -> None:
            while not done.is_set():
                peak_anon[0] = max(peak_anon[0], process_memory().get("RssAnon", 0))
                time.sleep(0.001)

        before = process_memory()
        if not before or not reset_peak_rss():
            raise RuntimeError("Peak memory needs Linux /proc/self/status and /proc/self/clear_refs.")
        sampler = threading.Thread(target=sample_anonymous_memory, daemon=True)
        sampler.start()
        start = time.perf_counter()
        model = load_and_touch(request["folder"])
        measured["seconds"].append(time.perf_counter() - start)
        after = process_memory()
        done.set()
        sampler.join()
        measured["peak_rss_bytes"].append(after["VmHWM"] - before["VmRSS"])
        measured["peak_anon_bytes"].append(max(peak_anon[0], after["RssAnon"]) - before["RssAnon"])
        measured["weight_bytes"] = weight_bytes(model)
        measured["dtypes"] = sorted({str(parameter.dtype).removeprefix("torch.") for parameter in model.parameters()})
        del model
    return measured


# --------------------------------------------------------------------------------------------------------------------
# The cases.


@dataclass
class BenchmarkSettings:
    size: str = "small"
    repeats: int = 5
    warmup: int = 1
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    image_batch: int = 1
    train_batch: int = 2
    compile: bool = True
    device: str = "cpu"
    threads: int | None = None


@dataclass
class BenchmarkModels:
    """The fp32 model (plain and SDPA variants share it), its bf16 copy, the processor and the saved checkpoints."""

    fp32: MiniGPT4ForConditionalGeneration
    bf16: MiniGPT4ForConditionalGeneration
    processor: MiniGPT4Processor
    device: torch.device
    workdir: Path


def variant_rows(times: dict[str, list[float]], peaks: dict[str, int | None], plain: str) -> dict[str, dict]:
    """Per variant: seconds (median, spread), peak memory and speedup over `plain` (ratio of medians)."""
    plain_median = statistics.median(times[plain])
    rows = {}
    for name, samples in times.items():
        stats = summarize(samples)
        rows[name] = {
            "seconds": stats,
            "peak_memory_bytes": peaks.get(name),
            "speedup_vs_plain": plain_median / stats["median"],
        }
    return rows


def image_encoding_case(models: BenchmarkModels, settings: BenchmarkSettings) -> dict:
    """`get_image_features` on `image_batch` images: plain against SDPA, compiled vision model and bf16."""
    image = load_rgb_image(EXAMPLE_IMAGE)
    pixel_values = models.processor.image_processor([image] * settings.image_batch, return_tensors="pt")
    pixel_values = pixel_values["pixel_values"].to(models.device)
    setups = {
        "plain (eager, fp32)": ModelSetup(models.fp32, attention="eager"),
        "sdpa": ModelSetup(models.fp32),
        FAST_IMAGE_ENCODING: ModelSetup(models.bf16),
    }
    compile_seconds = compile_error = None
    if settings.compile:
        try:
            with torch.inference_mode(), ModelSetup(models.fp32, compile_vision=True).applied() as model:
                start = time.perf_counter()
                model.get_image_features(pixel_values)
                compile_seconds = time.perf_counter() - start
            setups["sdpa + compiled vision model"] = ModelSetup(models.fp32, compile_vision=True)
        # No C++ compiler, an unsupported platform: report it and measure the other variants.
        except Exception as error:  # noqa: BLE001
            compile_error = f"{type(error).__name__}: {error}"[:300]
            ModelSetup(models.fp32).apply()

    def encode(setup: ModelSetup) -> Callable[[], torch.Tensor]:
        def encode_images() -> torch.Tensor:
            with setup.applied() as model:
                return model.get_image_features(pixel_values)

        return encode_images

    variants = {name: encode(setup) for name, setup in setups.items()}
    with torch.inference_mode():
        times = run_interleaved(variants, settings.repeats, settings.warmup, models.device, desc="image encoding")
        peaks = {name: peak_memory_of(run, models.device) for name, run in variants.items()}
    ModelSetup(models.fp32).apply()  # the shared model goes on uncompiled, with SDPA
    return {
        "images": settings.image_batch,
        "variants": variant_rows(times, peaks, "plain (eager, fp32)"),
        "compile_seconds": compile_seconds,
        "compile_error": compile_error,
    }


def generation_inputs(models: BenchmarkModels, batch_size: int) -> dict[str, torch.Tensor]:
    """Processor outputs for `batch_size` copies of the example image and prompt (left-padded)."""
    image = load_rgb_image(EXAMPLE_IMAGE)
    inputs = models.processor(images=[image] * batch_size, text=[PROMPT] * batch_size, return_tensors="pt")
    return {name: tensor.to(models.device) for name, tensor in inputs.items()}


def text_prompt_like(models: BenchmarkModels, input_ids: torch.LongTensor) -> torch.LongTensor:
    """`input_ids` with every image placeholder replaced by an ordinary text token: a text prompt of the same length."""
    filler = models.processor.tokenizer(" image", add_special_tokens=False)["input_ids"][-1]
    return input_ids.masked_fill(input_ids == models.fp32.config.image_token_id, filler)


def bare_language_model(model: MiniGPT4ForConditionalGeneration) -> torch.nn.Module:
    """`model`'s language model and output head as a plain causal language model (the same modules, not copies)."""
    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(model.config.text_config)
    causal_lm.model = model.language_model
    causal_lm.lm_head = model.lm_head
    return causal_lm.eval()


def decode_case(models: BenchmarkModels, settings: BenchmarkSettings) -> dict:
    """Prefill and decode of `generate()` with an image against the bare language model from a same-length text."""
    model = models.fp32
    inputs = generation_inputs(models, 1)
    text_ids = text_prompt_like(models, inputs["input_ids"])
    generate_kwargs = fixed_length_generate_kwargs(model, settings.new_tokens)

    def with_image(processors: LogitsProcessorList) -> torch.LongTensor:
        return model.generate(**inputs, logits_processor=processors, **generate_kwargs)

    language_model = bare_language_model(model)

    def text_only(processors: LogitsProcessorList) -> torch.LongTensor:
        return language_model.generate(
            input_ids=text_ids, attention_mask=inputs["attention_mask"], logits_processor=processors, **generate_kwargs
        )

    length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        runs = compare_generation(
            {"MiniGPT-4 with image": with_image, "language model, text prompt": text_only},
            batch_sizes={"MiniGPT-4 with image": 1, "language model, text prompt": 1},
            prompt_lengths={"MiniGPT-4 with image": length, "language model, text prompt": length},
            new_tokens=settings.new_tokens,
            repeats=settings.repeats,
            warmup=settings.warmup,
            device=models.device,
            desc="prefill + decode",
        )
        summaries = {name: run.summary() for name, run in runs.items()}
        for name, generate in (("MiniGPT-4 with image", with_image), ("language model, text prompt", text_only)):
            summaries[name]["peak_memory_bytes"] = peak_memory_of(
                lambda generate=generate: generate(LogitsProcessorList()), models.device
            )
    image_rate = summaries["MiniGPT-4 with image"]["decode_tokens_per_s"]
    text_rate = summaries["language model, text prompt"]["decode_tokens_per_s"]
    return {"prompt_length": length, "variants": summaries, "decode_ratio": image_rate / text_rate}


def batched_generation_case(models: BenchmarkModels, settings: BenchmarkSettings) -> dict:
    """Greedy generation with images at each batch size: end-to-end and decode-only tokens/s, peak memory."""
    model = models.fp32
    generate_kwargs = fixed_length_generate_kwargs(model, settings.new_tokens)
    inputs = {batch: generation_inputs(models, batch) for batch in settings.batch_sizes}

    def generate_batch(batch: int) -> Callable[[LogitsProcessorList], torch.LongTensor]:
        def generate_rows(processors: LogitsProcessorList) -> torch.LongTensor:
            return model.generate(**inputs[batch], logits_processor=processors, **generate_kwargs)

        return generate_rows

    names = {batch: f"batch {batch}" for batch in settings.batch_sizes}
    with torch.inference_mode():
        runs = compare_generation(
            {names[batch]: generate_batch(batch) for batch in settings.batch_sizes},
            batch_sizes={names[batch]: batch for batch in settings.batch_sizes},
            prompt_lengths={names[batch]: inputs[batch]["input_ids"].shape[1] for batch in settings.batch_sizes},
            new_tokens=settings.new_tokens,
            repeats=settings.repeats,
            warmup=settings.warmup,
            device=models.device,
            desc="batched generation",
        )
        rows = []
        for batch in settings.batch_sizes:
            row = runs[names[batch]].summary()
            row["peak_memory_bytes"] = peak_memory_of(
                lambda batch=batch: generate_batch(batch)(LogitsProcessorList()), models.device
            )
            rows.append(row)
    return {"rows": rows}


def training_batch(models: BenchmarkModels, batch_size: int) -> dict[str, torch.Tensor]:
    """A stage-2-like training batch: image, prompt and answer (labels on the answer only)."""
    image = load_rgb_image(EXAMPLE_IMAGE)
    batch = models.processor(
        images=[image] * batch_size, text=[PROMPT] * batch_size, suffix=[ANSWER] * batch_size, return_tensors="pt"
    )
    return {name: tensor.to(models.device) for name, tensor in batch.items()}


def training_step(setup: ModelSetup, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One step: forward with labels, backward, AdamW step on the trainable parameters, gradients released."""
    optimizer = torch.optim.AdamW([p for p in setup.model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> torch.Tensor:
        with setup.applied() as model:
            model.train()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def gradients_after_backward(setup: ModelSetup, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Gradient bytes (trainable / frozen parameters) right after one backward pass, before they are released."""
    with setup.applied() as model:
        model.train()
        model(**batch).loss.backward()
        held = gradient_bytes(model)
        model.zero_grad(set_to_none=True)
    return held


def training_case(models: BenchmarkModels, settings: BenchmarkSettings) -> dict:
    """One training step (frozen ViT, Q-Former and LM; trained projection): plain against the faster setups."""
    batch = training_batch(models, settings.train_batch)
    low_precision = torch.bfloat16
    setups = {
        "plain (eager, fp32, encoders under grad mode)": ModelSetup(
            models.fp32, attention="eager", frozen_encoders_without_grad=False
        ),
        "eager + no_grad encoders": ModelSetup(models.fp32, attention="eager"),
        "sdpa + no_grad encoders": ModelSetup(models.fp32),
        "sdpa + no_grad encoders + bf16 autocast": ModelSetup(models.fp32, autocast_dtype=low_precision),
        FAST_TRAINING_STEP: ModelSetup(models.bf16),
    }
    # Mixed precision as trainers do it: the frozen parts compute in bf16, the trained projection keeps fp32 weights.
    models.bf16.language_projection.float()
    steps = {name: training_step(setup, batch) for name, setup in setups.items()}
    times = run_interleaved(steps, settings.repeats, settings.warmup, models.device, desc="training step")
    peaks = {name: peak_memory_of(step, models.device) for name, step in steps.items()}
    losses = {name: float(step()) for name, step in steps.items()}
    gradients = {
        "plain": gradients_after_backward(setups["plain (eager, fp32, encoders under grad mode)"], batch),
        "fast": gradients_after_backward(setups[FAST_TRAINING_STEP], batch),
    }
    for model in (models.fp32, models.bf16):
        ModelSetup(model).apply().eval()
    return {
        "batch_size": settings.train_batch,
        "sequence_length": int(batch["input_ids"].shape[1]),
        "variants": variant_rows(times, peaks, "plain (eager, fp32, encoders under grad mode)"),
        "losses": losses,
        "gradient_bytes": gradients,
        "trainable_parameters": sum(p.numel() for p in models.fp32.parameters() if p.requires_grad),
    }


def loading_case(models: BenchmarkModels, repeats: int) -> dict:
    """
    Peak memory and time of `from_pretrained(..., dtype=torch.bfloat16)` for a bf16 and an fp32 checkpoint of the
    model, `repeats` loads each (at most 3: the peak hardly varies).
    """
    repeats = min(repeats, 3)
    workdir = models.workdir
    warmup_folder = workdir / "warmup_tiny"
    tiny, _ = build_random_model("tiny")
    tiny.to(torch.bfloat16).save_pretrained(warmup_folder)
    fp32_folder = workdir / "checkpoint_fp32"
    models.fp32.save_pretrained(fp32_folder)
    results = {}
    for name, folder in (("bf16 checkpoint", workdir / "checkpoint_bf16"), ("fp32 checkpoint", fp32_folder)):
        measured = measure_loading(folder, warmup_folder, workdir / "hf_modules", repeats=repeats)
        weights = measured["weight_bytes"]
        results[name] = {
            "seconds": summarize(measured["seconds"]),
            # The worst of the repeats: a peak is what has to fit.
            "peak_rss_bytes": max(measured["peak_rss_bytes"]),
            "peak_anon_bytes": max(measured["peak_anon_bytes"]),
            "peak_rss_ratio": max(measured["peak_rss_bytes"]) / weights,
            "peak_anon_ratio": max(measured["peak_anon_bytes"]) / weights,
            "weight_bytes": weights,
            "dtypes": measured["dtypes"],
            "per_repeat": {key: measured[key] for key in ("peak_rss_bytes", "peak_anon_bytes")},
        }
    return results


# --------------------------------------------------------------------------------------------------------------------
# Targets and report.


def check_target(name: str, value: float | None) -> dict:
    """`{"value", "goal", "pass"}` for a target of `TARGET_GOALS` (`pass` is `False` when nothing was measured)."""
    comparison, goal = TARGET_GOALS[name]
    passed = (
        value is not None
        and {
            ">=": value >= goal,
            "<=": value <= goal,
            "==": value == goal,
        }[comparison]
    )
    return {"value": value, "goal": f"{comparison} {goal}", "pass": bool(passed)}


def compute_targets(cases: dict) -> dict:
    """The values of `TARGET_GOALS` from the measured cases, each checked against its goal."""
    values = {
        "decode_tokens_per_s_image_vs_text_lm": cases["decode"]["decode_ratio"],
        "image_encoding_speedup_vs_plain": cases["image_encoding"]["variants"][FAST_IMAGE_ENCODING]["speedup_vs_plain"],
        "training_step_speedup_vs_plain": cases["training_step"]["variants"][FAST_TRAINING_STEP]["speedup_vs_plain"],
        "bf16_load_peak_rss_vs_bf16_weights": cases["loading"]["bf16 checkpoint"]["peak_rss_ratio"],
        "bf16_load_of_fp32_checkpoint_peak_anon_vs_bf16_weights": cases["loading"]["fp32 checkpoint"][
            "peak_anon_ratio"
        ],
        "frozen_weight_gradient_bytes": max(
            held["frozen"] for held in cases["training_step"]["gradient_bytes"].values()
        ),
    }
    rates = {row["batch_size"]: row["tokens_per_s"] for row in cases["batched_generation"]["rows"]}
    if 1 in rates and 8 in rates:
        values["batch8_vs_batch1_generation_tokens_per_s"] = rates[8] / rates[1]
    return {name: check_target(name, value) for name, value in values.items()}


def machine_description(device: torch.device) -> dict:
    """What the numbers were measured on."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            processor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    import transformers

    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": processor,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """Builds the random model of `settings.size`, runs every case and returns the results with their targets."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    model, processor = build_random_model(settings.size)
    model.to(device)
    with tempfile.TemporaryDirectory(prefix="minigpt4-benchmark-") as workdir:
        workdir = Path(workdir)
        bf16 = load_bf16_copy(model, processor, workdir / "checkpoint_bf16", device)
        models = BenchmarkModels(model.eval(), bf16.eval(), processor, device, workdir)
        cases = {}
        steps = [
            ("image_encoding", lambda: image_encoding_case(models, settings)),
            ("decode", lambda: decode_case(models, settings)),
            ("batched_generation", lambda: batched_generation_case(models, settings)),
            ("training_step", lambda: training_case(models, settings)),
            ("loading", lambda: loading_case(models, settings.repeats)),
        ]
        for name, run_case in tqdm(steps, desc=f"benchmark ({settings.size})", unit="case"):
            cases[name] = run_case()
    return {
        "size": settings.size,
        "settings": {key: value for key, value in vars(settings).items()},
        "machine": machine_description(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
        "cases": cases,
        "targets": compute_targets(cases),
    }


def _format_seconds(stats: dict) -> str:
    return f"{stats['median'] * 1e3:.1f} ms [{stats['p25'] * 1e3:.1f}-{stats['p75'] * 1e3:.1f}]"


def _format_bytes(count: int | None) -> str:
    return "-" if count is None else f"{count / MB:.1f} MB"


def results_table(results: dict) -> str:
    """The measured cases and the targets as Markdown tables."""
    cases = results["cases"]
    machine, load = results["machine"], results["load_average"]
    load_text = "n/a" if load["start"] is None else f"{load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end"
    heading = (
        f"MiniGPT-4 `{results['size']}` ({results['parameters'] / 1e6:.1f} M parameters, random weights) on "
        f"{machine['gpu'] or machine['cpu'] or machine['device']}, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, {results['date']}; 1-minute load average {load_text}; "
        f"{results['settings']['repeats']} interleaved repeats per variant."
    )
    lines = [
        heading,
        "",
        "| case | variant | median [p25-p75] | peak memory | ratio |",
        "|---|---|---|---|---|",
    ]
    for case in ("image_encoding", "training_step"):
        for name, row in cases[case]["variants"].items():
            lines.append(
                f"| {case.replace('_', ' ')} | {name} | {_format_seconds(row['seconds'])} | "
                f"{_format_bytes(row['peak_memory_bytes'])} | {row['speedup_vs_plain']:.2f}x vs plain |"
            )
    for name, row in cases["decode"]["variants"].items():
        lines.append(
            f"| prefill ({cases['decode']['prompt_length']} tokens) | {name} | {_format_seconds(row['prefill_s'])} "
            "| - | - |"
        )
    for name, row in cases["decode"]["variants"].items():
        lines.append(
            f"| decode | {name} | {_format_seconds(row['decode_step_s'])} | "
            f"{_format_bytes(row['peak_memory_bytes'])} | "
            f"{row['decode_tokens_per_s']:.1f} tokens/s |"
        )
    for row in cases["batched_generation"]["rows"]:
        lines.append(
            f"| generation ({row['new_tokens']} new tokens) | batch {row['batch_size']} | "
            f"{_format_seconds(row['total_s'])} | {_format_bytes(row['peak_memory_bytes'])} | "
            f"{row['tokens_per_s']:.1f} tokens/s ({row['decode_tokens_per_s']:.1f} decoding) |"
        )
    for name, row in cases["loading"].items():
        lines.append(
            f"| loading in bf16 | {name} | {_format_seconds(row['seconds'])} | "
            f"RSS {_format_bytes(row['peak_rss_bytes'])}, anon {_format_bytes(row['peak_anon_bytes'])} | "
            f"{row['peak_rss_ratio']:.2f}x / "
            f"{row['peak_anon_ratio']:.2f}x of {_format_bytes(row['weight_bytes'])} weights |"
        )
    lines += ["", "| target | value | goal | pass |", "|---|---|---|---|"]
    for name, target in results["targets"].items():
        value = target["value"]
        shown = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"| {name} | {shown} | {target['goal']} | {'PASS' if target['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    """Writes `results` to `path` through a temporary file (never half-written)."""
    write_text_atomically(path, json.dumps(results, indent=2) + "\n")


def plot_batch_scaling(results: dict, path: Path) -> None:
    """PNG of generation tokens/s (end to end and decode only) against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = results["cases"]["batched_generation"]["rows"]
    batches = [row["batch_size"] for row in rows]
    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot(batches, [row["tokens_per_s"] for row in rows], marker="o", label="generate() end to end")
    axes.plot(batches, [row["decode_tokens_per_s"] for row in rows], marker="s", label="decode steps only")
    axes.set_xscale("log", base=2)
    axes.set_xticks(batches, [str(batch) for batch in batches])
    axes.set_xlabel("batch size")
    axes.set_ylabel("new tokens / s")
    machine = results["machine"]
    axes.set_title(
        f"MiniGPT-4 '{results['size']}', greedy, {rows[0]['new_tokens']} new tokens\n"
        f"{machine['device']}, {machine['torch_threads']} threads",
        fontsize=9,
    )
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    pyplot.close(figure)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--loading-child":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(json.dumps(_loading_child(json.loads(sys.argv[2]))))
