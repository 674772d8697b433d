#!/usr/bin/env python
"""
Prints (Markdown) the parameters and weight memory of each released MiniGPT model per part, at fp32 / bf16 / int8 /
int4 as the chat, caption and demo tools load them, and which load flags fit which GPU: MiniGPT-4 with Vicuna-7B and
-13B v0, MiniGPT-4 with Llama-2-7B-chat, and MiniGPT-v2 (Llama-2-7B-chat, 448 px).

The models are built from their configs on the meta device: nothing is downloaded or allocated. The model card of a
converted checkpoint holds the same tables for its own config (`memory_tables`).

    python -m minigpt4_hf.memory_table
"""


import torch
from torch import nn

from configuration_minigpt4 import MiniGPT4Config
from minigpt4_hf.cli.options import CommandLineParser
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration


# LLaMA-1 / Vicuna v0 and Llama-2 sizes (the vision part is MiniGPT4Config's default: the EVA ViT-g/14 of BLIP-2).
LLAMA_SIZES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
# name -> (variant, LLaMA size, vocabulary, context length of the language model)
RELEASED_MODELS = {
    "MiniGPT-4 Vicuna-7B v0": ("vicuna0", "7B", 32001, 2048),
    "MiniGPT-4 Vicuna-13B v0": ("vicuna0", "13B", 32001, 2048),
    "MiniGPT-4 Llama-2-7B-chat": ("llama2", "7B", 32000, 4096),
    "MiniGPT-v2 Llama-2-7B-chat": ("v2", "7B", 32000, 4096),
}
# part name -> top-level module names (under `model.` in the backbone layout) that make it up
PARTS = {
    "vision (EVA ViT-g + ln_vision)": ("vision_model",),
    "Q-Former + queries": ("qformer", "query_tokens"),
    "projection (llama_proj)": ("language_projection",),
    "language model": ("language_model", "lm_head"),
}
MODES = {  # column name: the load flags of minigpt4-chat, -caption and -demo that give it
    "fp32": "--dtype float32",
    "bf16": "--dtype bfloat16",
    "int8": "--load-in-8bit",
    "int4": "--load-in-4bit",
}
GPU_SIZES_GIB = [12, 16, 24, 40, 80]
CONTEXT_TOKENS = 2000  # the original chat's budget (prompt + answer), the same in MiniGPT-v2's demo
OVERHEAD_GIB = 1.0  # CUDA context, activations of one image and one prompt, allocator slack (an estimate)
GIB = 1024**3


def released_config(variant: str, size: str, vocab_size: int, max_positions: int = 2048) -> MiniGPT4Config:
    """The config of a released model: the Q-Former bridge for vicuna0, token merging for llama2 and v2 (448 px)."""
    text_config = {"model_type": "llama", "vocab_size": vocab_size, "max_position_embeddings": max_positions,
                   "rms_norm_eps": 1e-6 if variant == "vicuna0" else 1e-5, **LLAMA_SIZES[size]}
    if variant == "vicuna0":
        return MiniGPT4Config(text_config=text_config)
    vision_config = {"image_size": 448} if variant == "v2" else {}
    return MiniGPT4Config(text_config=text_config, vision_config=vision_config, use_qformer=False, variant=variant)


def build_meta_model(config: MiniGPT4Config) -> MiniGPT4ForConditionalGeneration:
    """The model of `config` with its parameters on the meta device."""
    with torch.device("meta"):
        return MiniGPT4ForConditionalGeneration(config)


def part_of(name: str) -> str | None:
    """The part (a `PARTS` key) that a parameter or module name belongs to, in either checkpoint layout."""
    top = name.removeprefix("model.").split(".")[0]
    return next((part for part, modules in PARTS.items() if top in modules), None)


def quantised_weight_bytes(weight: torch.Tensor, mode: str) -> float:
    """bitsandbytes storage of one linear weight: int8 + a float32 scale per row; NF4 with double-quantised scales."""
    numel = weight.numel()
    if mode == "int8":
        return numel + weight.shape[0] * 4
    # 4 bits per weight, one int8 absmax per 64 weights, one float32 per 256 absmax blocks.
    return numel / 2 + numel / 64 + numel / 64 / 256 * 4


def part_sizes(model: nn.Module, mode: str) -> dict[str, tuple[int, float]]:
    """`{part: (parameters, weight bytes when loaded in mode)}` for the parts the model has."""
    quantised = set()
    if mode in ("int8", "int4"):  # the language model's linear layers, not its output head
        quantised = {
            f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and part_of(name) == "language model" and not name.endswith("lm_head")
        }
    keep_fp32 = tuple(model._keep_in_fp32_modules or ())
    sizes: dict[str, tuple[int, float]] = {}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        if name in quantised:
            nbytes = quantised_weight_bytes(parameter, mode)
        elif mode == "fp32":
            nbytes = parameter.numel() * 4
        elif mode == "bf16":
            nbytes = parameter.numel() * 2
        else:  # 8-/4-bit load the rest in float16, where transformers keeps the Q-Former and queries in float32
            nbytes = parameter.numel() * (4 if name.removeprefix("model.").startswith(keep_fp32) else 2)
        count, total = sizes.get(part, (0, 0.0))
        sizes[part] = (count + parameter.numel(), total + nbytes)
    return {part: sizes[part] for part in PARTS if part in sizes}


def kv_cache_bytes(config: MiniGPT4Config, mode: str, tokens: int = CONTEXT_TOKENS) -> float:
    """Key/value cache of one sequence of `tokens` tokens (batch 1, one beam)."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
    return per_token * tokens * (4 if mode == "fp32" else 2)


def format_params(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"


def memory_tables(models: dict[str, MiniGPT4Config]) -> str:
    """The two Markdown tables (weights per part; GPU fit) for `{name: config}`."""
    lines = ["Weights per part (parameters; GiB of weights as loaded):", ""]
    lines.append("| model | part | parameters | " + " | ".join(MODES) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(MODES))
    totals = {}
    for name, config in models.items():
        model = build_meta_model(config)
        per_mode = {mode: part_sizes(model, mode) for mode in MODES}
        for part, (count, _) in per_mode["fp32"].items():
            cells = [f"{per_mode[mode][part][1] / GIB:.2f}" for mode in MODES]
            lines.append(f"| {name} | {part} | {format_params(count)} | " + " | ".join(cells) + " |")
        weights = {mode: sum(nbytes for _, nbytes in per_mode[mode].values()) for mode in MODES}
        count = sum(count for count, _ in per_mode["fp32"].values())
        lines.append(f"| **{name}** | **total** | **{format_params(count)}** | "
                     + " | ".join(f"**{weights[mode] / GIB:.2f}**" for mode in MODES) + " |")
        totals[name] = {mode: (weights[mode], kv_cache_bytes(config, mode)) for mode in MODES}

    lines += ["", f"Estimated GPU memory for a chat (weights + a {CONTEXT_TOKENS}-token KV cache + "
              f"{OVERHEAD_GIB:.0f} GiB overhead), and whether it fits a GPU of that size (90% usable):", ""]
    lines.append("| model | flags | estimate (GiB) | " + " | ".join(f"{gib} GB" for gib in GPU_SIZES_GIB) + " |")
    lines.append("|---|---|---:|" + ":---:|" * len(GPU_SIZES_GIB))
    for name, modes in totals.items():
        for mode, (weights, cache) in modes.items():
            estimate = (weights + cache) / GIB + OVERHEAD_GIB
            fits = ["yes" if estimate <= 0.9 * gib else "no" for gib in GPU_SIZES_GIB]
            lines.append(f"| {name} | `{MODES[mode]}` | {estimate:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def tables() -> str:
    """The tables of every released model."""
    return memory_tables({name: released_config(*spec) for name, spec in RELEASED_MODELS.items()})


def main(argv: list[str] | None = None) -> int:
    CommandLineParser("python -m minigpt4_hf.memory_table", description=__doc__).parse_args(argv)
    print(tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
