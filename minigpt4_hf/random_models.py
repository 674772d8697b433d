"""
Small randomly initialised MiniGPT-4 models of named sizes (tests, the quickstart, the benchmark) and the bundled
assets. torch and transformers are imported when a model is built, so the tools' `--help` can list the sizes fast.
"""

import os
from pathlib import Path


ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"
EXAMPLE_IMAGE = ASSETS_DIR / "example.jpg"

# A small LLaMA (8 layers, width 512) for the random models above "tiny".
SMALL_LLAMA = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048,
               "rms_norm_eps": 1e-6}
# Named sizes of random models (the real MiniGPT-4 sizes are MiniGPT4Config's defaults).
MODEL_SIZES = {
    # The sizes of tests/fixtures/original_tiny (56 px, 6 queries, LLaMA width 64).
    "tiny": {
        "vision_config": {"image_size": 56, "patch_size": 14, "hidden_size": 56, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "intermediate_size": 244},
        "qformer_config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 192},
        "text_config": {**SMALL_LLAMA, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 4},
        "num_query_tokens": 6,
    },
    "small": {
        "vision_config": {"image_size": 224, "patch_size": 14, "hidden_size": 384, "num_hidden_layers": 6,
                          "num_attention_heads": 6, "intermediate_size": 1536},
        "qformer_config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "intermediate_size": 1024},
        "text_config": SMALL_LLAMA,
        "num_query_tokens": 32,
    },
    # The real ViT-g + Q-Former shapes; a small LLaMA.
    "vision-full": {"vision_config": {}, "qformer_config": {}, "text_config": SMALL_LLAMA, "num_query_tokens": 32},
}


def build_random_model(size: str = "tiny", tokenizer_dir: str | os.PathLike = TINY_TOKENIZER_DIR, seed: int = 0,
                       variant: str = "vicuna0", **config_overrides):
    """
    A randomly initialised MiniGPT-4 of a named size and variant, and its processor, around a LLaMA tokenizer.

    `variant` picks the bridge and the chat template: `"vicuna0"` has the Q-Former; `"llama2"` and `"v2"` merge 4
    patch tokens instead, and `"v2"` runs at twice the size's image size (448 px for the real sizes, as MiniGPT-v2).
    The vocabulary, special-token ids, image token and stop sequences come from the tokenizer, so the pair behaves
    like a converted checkpoint. Returns `(model, processor)`.
    """
    import torch
    from transformers import AutoTokenizer

    from configuration_minigpt4 import MiniGPT4Config
    from modeling_minigpt4 import MiniGPT4ForConditionalGeneration
    from processing_minigpt4 import CHAT_TEMPLATES, MiniGPT4Processor, variant_stop_token_ids

    if size not in MODEL_SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {', '.join(MODEL_SIZES)}.")
    if variant not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {', '.join(CHAT_TEMPLATES)}.")
    sizes = MODEL_SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision = dict(sizes["vision_config"])
    if variant == "v2":
        vision["image_size"] = 2 * vision.get("image_size", 224)
    processor = MiniGPT4Processor.from_tokenizer(
        tokenizer, image_size=vision.get("image_size", 224), chat_template=CHAT_TEMPLATES[variant]
    )
    text = dict(sizes["text_config"])
    text.update(vocab_size=len(tokenizer) - 1, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings = {
        "vision_config": vision,
        "qformer_config": dict(sizes["qformer_config"]),
        "text_config": text,
        "num_query_tokens": sizes["num_query_tokens"],
        "image_token_id": processor.image_token_id,
        "stop_token_ids": variant_stop_token_ids(tokenizer, variant),
        "variant": variant,
        "use_qformer": variant == "vicuna0",
    }
    config = MiniGPT4Config(**{**settings, **config_overrides})
    processor.num_image_tokens = config.num_image_tokens
    torch.manual_seed(seed)
    model = MiniGPT4ForConditionalGeneration(config).eval()
    return model, processor
