#!/usr/bin/env python
"""
Prints (Markdown) the parameters and weight memory of MiniGPT-4 per part, for the Vicuna-7B and -13B configs, at
fp32 / bf16 / int8 / int4 as `minigpt4_hf.inference.load_model_and_processor` loads them, and which load flags fit
which GPU.

The models are built from their configs on the meta device: nothing is downloaded or allocated.

    python -m minigpt4_hf.memory_table
"""



import torch
from torch import nn

from configuration_minigpt4 import MiniGPT4Config
from minigpt4_hf.cli.options import CommandLineParser
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration


# LLaMA-1 / Vicuna v0 sizes (the vision and Q-Former parts are MiniGPT4Config's defaults: EVA ViT-g/14, BLIP-2).
LLAMA_SIZES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
PARTS = {
    "vision (EVA ViT-g + ln_vision)": ("vision_model",),
    "Q-Former + queries": ("qformer", "query_tokens"),
    "projection (llama_proj)": ("language_projection",),
    "language model (Vicuna)": ("language_model",),
}
MODES = {  # column name: the load flags of minigpt4-chat, -caption and -demo that give it
    "fp32": "--dtype float32",
    "bf16": "--dtype bfloat16",
    "int8": "--load-in-8bit",
    "int4": "--load-in-4bit",
}
GPU_SIZES_GIB = [12, 16, 24, 40, 80]
CONTEXT_TOKENS = 2000  # the original chat's budget (prompt + answer)
OVERHEAD_GIB = 1.0  # CUDA context, activations of one image and one prompt, allocator slack (an estimate)
GIB = 1024**3


def build_meta_model(size: str) -> MiniGPT4ForConditionalGeneration:
    """MiniGPT-4 with the Vicuna `size` language model, parameters on the meta device."""
    text_config = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 2048,
                   "rms_norm_eps": 1e-6, **LLAMA_SIZES[size]}
    config = MiniGPT4Config(text_config=text_config)
    with torch.device("meta"):
        return MiniGPT4ForConditionalGeneration(config)


def quantised_weight_bytes(weight: torch.Tensor, mode: str) -> float:
    """bitsandbytes storage of one linear weight: int8 + a float32 scale per row; NF4 with double-quantised scales."""
    numel = weight.numel()
    if mode == "int8":
        return numel + weight.shape[0] * 4
    # 4 bits per weight, one int8 absmax per 64 weights, one float32 per 256 absmax blocks.
    return numel / 2 + numel / 64 + numel / 64 / 256 * 4


def part_bytes(model: nn.Module, prefixes: tuple[str, ...], mode: str) -> float:
    """Weight bytes of the parameters under `prefixes` when loaded in `mode`."""
    quantised = set()
    if mode in ("int8", "int4") and prefixes == ("language_model",):
        quantised = {
            f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("language_model.") and not name.endswith("lm_head")
        }
    total = 0.0
    for name, parameter in model.named_parameters():
        if not name.startswith(prefixes):
            continue
        if name in quantised:
            total += quantised_weight_bytes(parameter, mode)
        elif mode == "fp32":
            total += parameter.numel() * 4
        elif mode == "bf16":
            total += parameter.numel() * 2
        else:  # 8-/4-bit load the rest in float16, where transformers keeps the Q-Former and queries in float32
            keep_fp32 = name.startswith(tuple(model._keep_in_fp32_modules))
            total += parameter.numel() * (4 if keep_fp32 else 2)
    return total


def kv_cache_bytes(model: MiniGPT4ForConditionalGeneration, mode: str, tokens: int = CONTEXT_TOKENS) -> float:
    """Key/value cache of one sequence of `tokens` tokens (batch 1, one beam)."""
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
    return per_token * tokens * (4 if mode == "fp32" else 2)


def format_params(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"


def tables() -> str:
    lines = ["Weights per part (parameters; GiB of weights as loaded):", ""]
    lines.append("| model | part | parameters | " + " | ".join(MODES) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(MODES))
    totals = {}
    for size in LLAMA_SIZES:
        model = build_meta_model(size)
        size_totals = dict.fromkeys(MODES, 0.0)
        size_params = 0
        for part, prefixes in PARTS.items():
            params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
            size_params += params
            cells = []
            for mode in MODES:
                nbytes = part_bytes(model, prefixes, mode)
                size_totals[mode] += nbytes
                cells.append(f"{nbytes / GIB:.2f}")
            lines.append(f"| {size} | {part} | {format_params(params)} | " + " | ".join(cells) + " |")
        lines.append(
            f"| **{size}** | **total** | **{format_params(size_params)}** | "
            + " | ".join(f"**{size_totals[mode] / GIB:.2f}**" for mode in MODES) + " |"
        )
        totals[size] = {mode: (size_totals[mode], kv_cache_bytes(model, mode)) for mode in MODES}

    lines += ["", f"Estimated GPU memory for a chat (weights + a {CONTEXT_TOKENS}-token KV cache + "
              f"{OVERHEAD_GIB:.0f} GiB overhead), and whether it fits a GPU of that size (90% usable):", ""]
    lines.append("| model | flags | estimate (GiB) | " + " | ".join(f"{gib} GB" for gib in GPU_SIZES_GIB) + " |")
    lines.append("|---|---|---:|" + ":---:|" * len(GPU_SIZES_GIB))
    for size, modes in totals.items():
        for mode, (weights, cache) in modes.items():
            estimate = (weights + cache) / GIB + OVERHEAD_GIB
            fits = ["yes" if estimate <= 0.9 * gib else "no" for gib in GPU_SIZES_GIB]
            lines.append(f"| {size} | `{MODES[mode]}` | {estimate:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    CommandLineParser("python -m minigpt4_hf.memory_table", description=__doc__).parse_args(argv)
    print(tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
