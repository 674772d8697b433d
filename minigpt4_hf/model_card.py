"""The model card (`README.md`) and the generation defaults written next to a converted MiniGPT-4 checkpoint."""

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm
from transformers import GenerationConfig

from configuration_minigpt4 import MiniGPT4Config
from minigpt4_hf.transformers_versions import supported_transformers_text
from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS


# `Chat.answer` of the original (minigpt4/conversation/conversation.py@22d8888, the version that trained the released
# weights), as generation_config.json holds it. The later original Chat used repetition_penalty 1.05; see LIMITATIONS
# for why that cannot carry over exactly.
ORIGINAL_CHAT_DEFAULTS = {
    "max_new_tokens": CHAT_GENERATION_DEFAULTS["max_new_tokens"],
    "num_beams": CHAT_GENERATION_DEFAULTS["num_beams"],
    "do_sample": CHAT_GENERATION_DEFAULTS["do_sample"],
    "top_p": CHAT_GENERATION_DEFAULTS["top_p"],
    "temperature": CHAT_GENERATION_DEFAULTS["temperature"],
    "repetition_penalty": CHAT_GENERATION_DEFAULTS["repetition_penalty"],
    "length_penalty": 1.0,
    "min_length": 1,
}

# The chat defaults of each released family's demo. MiniGPT-4 with Llama-2 was released with the same `Chat` as
# Vicuna v0 (`minigpt4/conversation/conversation.py@ef1ac08`); MiniGPT-v2's demo samples at temperature 0.6 with up to
# 500 new tokens and repetition_penalty 1.05 (`demo_v2.py@d94738a`).
GENERATION_DEFAULTS = {
    "vicuna0": ORIGINAL_CHAT_DEFAULTS,
    "llama2": ORIGINAL_CHAT_DEFAULTS,
    "v2": {**ORIGINAL_CHAT_DEFAULTS, "max_new_tokens": 500, "temperature": 0.6, "repetition_penalty": 1.05},
}

# LLM widths of the released MiniGPT-4 (Vicuna v0) checkpoints -> their names and Hub ids.
KNOWN_LANGUAGE_MODELS = {
    4096: ("Vicuna-7B v0", "lmsys/vicuna-7b-delta-v0"),
    5120: ("Vicuna-13B v0", "lmsys/vicuna-13b-delta-v0"),
}
# The language model of MiniGPT-4 with Llama-2 and of MiniGPT-v2 (width 4096, vocabulary 32000).
LLAMA2_CHAT = ("Llama-2-7B-chat", "meta-llama/Llama-2-7b-chat-hf")
# The EVA ViT-g + Q-Former of the LAVIS files are the ones of this BLIP-2 checkpoint.
BLIP2_HUB_ID = "Salesforce/blip2-flan-t5-xxl"

_SHARED_PARITY = (
    "checkpoints in the original file formats: converted and loaded with the Auto classes, the result reproduces, in "
    "float32 on CPU, "
)
PARITY_STATEMENTS = {
    "vicuna0": (
        "The converter is tested against the original code ([Vision-CAIR/MiniGPT-4]"
        "(https://github.com/Vision-CAIR/MiniGPT-4) at `d94738a`, with LAVIS' EVA ViT and Q-Former) on tiny random "
        + _SHARED_PARITY
        + "the pixel values (the resized uint8 image exactly), the ViT / `ln_vision` / Q-Former / projection outputs "
        "(within rtol 1e-4, atol 1e-5), the chat prompt and its token ids (exactly), the last-prompt logits and "
        "per-step scores (within 1e-3), the greedy generations for three images (every token), and the stage-1 and "
        "stage-2 training losses (within 1e-4), per-position losses and `llama_proj` gradients."
    ),
    "llama2": (
        "The converter is tested against the original code ([Vision-CAIR/MiniGPT-4]"
        "(https://github.com/Vision-CAIR/MiniGPT-4) at `d94738a`, `MiniGPT4` with `has_qformer: False`) on tiny random "
        + _SHARED_PARITY
        + "the pixel values, the grouped and projected image features, the chat prompt string and its segment token "
        "ids (with the original's BOS ids, exactly), the last-prompt logits and per-step scores, the greedy "
        "generations, and the stage-2 training losses and `llama_proj` gradients, within the tolerances of the "
        "original's recorded values."
    ),
    "v2": (
        "The converter is tested against the original code ([Vision-CAIR/MiniGPT-4]"
        "(https://github.com/Vision-CAIR/MiniGPT-4) at `d94738a`, `MiniGPTv2` with its LoRA) on tiny random "
        + _SHARED_PARITY
        + "the pixel values at 448 px (position embeddings interpolated as the original did), the grouped and "
        "projected image features, the chat prompt string and its segment token ids (the double BOS included, "
        "exactly), the last-prompt logits and per-step scores, the greedy generations, and the fine-tuning losses "
        "and `llama_proj` gradients, with the LoRA merged and as a PEFT adapter (whose LoRA gradients match too)."
    ),
}

_HALLUCINATION = (
    "**Hallucination.** The model describes objects and details that are not in the image, more often in long "
    "answers. Do not use the output as fact."
)
_PRECISION = (
    "**Precision.** The original ran the ViT with float16 Linear/Conv weights but float32 LayerNorms, position "
    "embeddings and biases under autocast; here each module has one dtype{qformer_note}. Outputs agree with the "
    "original to rounding, not bit for bit."
)
LIMITATIONS = {
    "vicuna0": [
        _HALLUCINATION + " MiniGPT-4's stage-2 captions were themselves generated by the stage-1 model.",
        "**Vicuna version.** The projection was trained against Vicuna **v0** (vocabulary 32001: LLaMA's 32000 plus "
        "`[PAD]`). Vicuna v1.1 and later (vocabulary 32000, other prompt separators) with this projection produce "
        "garbled text. The converter refuses a tokenizer whose size differs from the embedding rows, and a projection "
        "whose width does not fit the language model (5120 = 13B, 4096 = 7B).",
        "**Repetition penalty.** The original generated from `inputs_embeds` only, so its repetition penalty saw no "
        "prompt tokens (only a placeholder BOS); transformers' `generate` also penalises the prompt's tokens. With "
        "the default `repetition_penalty=1.0` (the version that trained these weights) this makes no difference; "
        "with the later original chat's 1.05, generations differ from the original's.",
        _PRECISION.format(qformer_note=" (the Q-Former and query tokens stay float32 in float16 checkpoints)"),
        "**Prompt format.** The model was trained on `###Human: <Img><ImageHere></Img> ... ###Assistant: `; the "
        "processor's chat template reproduces the original `CONV_VISION_Vicuna0` conversation. Other formats work "
        "worse.",
    ],
    "llama2": [
        _HALLUCINATION,
        "**Prompt format.** Training used `[INST] <Img><ImageHere></Img> ... [/INST] ` after one BOS; the original "
        "demo (`CONV_VISION_LLama2`), which the chat template reproduces, puts the Vicuna system text first and a "
        "literal `<s>` (a second BOS id) before `[INST]`. Both come from the original; the mismatch is inherited.",
        "**Stopping.** The original demo passed Vicuna's `###` stop ids to this model too; it stops on Llama-2's EOS "
        "in practice. The generation config stops on both.",
        _PRECISION.format(qformer_note=""),
    ],
    "v2": [
        _HALLUCINATION + " Boxes can be wrong or point at the wrong object; check them before use.",
        "**Prompt format.** The chat template writes `<s>[INST] <Img><ImageHere></Img> [task] ... [/INST]` as the "
        "original demo and evaluation did, so the prompt starts with two BOS ids (the processor's and the literal "
        "`<s>`); training used one. In a multi-turn chat earlier answers are replaced by `</s>` as in the demo "
        "(`keep_previous_answers=True` keeps them).",
        "**LoRA.** The original kept the LoRA (r 64, alpha 16 on `q_proj`/`v_proj`) beside the weights; a merged "
        "checkpoint folds it in (float32, then cast), so outputs agree to rounding, not bit for bit.",
        "**Boxes.** Box coordinates are integers on a 0-100 grid of the original image (truncated), so a box is exact "
        "to 1% of the image size at best; the image is squashed to 448 x 448 without cropping.",
        _PRECISION.format(qformer_note=""),
    ],
}

_LICENSE_PARTS = (
    "The EVA ViT-g weights come from BLIP-2 (Salesforce LAVIS, BSD-3-Clause) and the projection from {project} "
    "(Vision-CAIR, BSD-3-Clause)."
)
LICENSE_NOTES = {
    "vicuna0": (
        "The language-model weights derive from LLaMA (Meta's non-commercial research licence) through Vicuna v0 "
        "(LMSYS; non-commercial use). The EVA ViT-g and Q-Former weights come from BLIP-2 (Salesforce LAVIS, "
        "BSD-3-Clause) and the projection from MiniGPT-4 (Vision-CAIR, BSD-3-Clause). The licence of the strictest "
        "part applies to this checkpoint as a whole: check each of them before use."
    ),
    "llama2": (
        "The language model is Llama-2-7B-chat, under the [Llama 2 Community License]"
        "(https://ai.meta.com/llama/license/) and its Acceptable Use Policy, which apply to this checkpoint. "
        + _LICENSE_PARTS.format(project="MiniGPT-4")
    ),
    "v2": (
        "The language model is Llama-2-7B-chat (with MiniGPT-v2's LoRA), under the [Llama 2 Community License]"
        "(https://ai.meta.com/llama/license/) and its Acceptable Use Policy, which apply to this checkpoint. "
        + _LICENSE_PARTS.format(project="MiniGPT-v2")
    ),
}

# MiniGPT-v2's task identifiers: what each asks for and an instruction of the original's training pool
# (minigpt4/datasets/datasets/*.py@d94738a).
V2_TASKS = (
    ("vqa", "a short answer to a question", "[vqa] What is the man holding?"),
    ("caption", "a short caption", "[caption] Briefly describe this image."),
    ("grounding", "a detailed description with a box after each object", "[grounding] describe this image in detail"),
    ("refer", "the box of the object a phrase refers to", "[refer] where is the red umbrella?"),
    ("detection", "the boxes of the objects a phrase or caption names", "[detection] dogs"),
    ("identify", "what the object in a box is", "[identify] what is this {<25><30><60><90>}"),
)


@dataclass(frozen=True)
class VariantCard:
    """What a model card says about one released family."""

    title: str
    paper: str
    summary: str  # the opening paragraph; {image_tokens}, {llm} are filled in
    tags: tuple[str, ...]
    stops: str  # where generation stops, in words


VARIANT_CARDS = {
    "vicuna0": VariantCard(
        title="MiniGPT-4",
        paper="[MiniGPT-4](https://arxiv.org/abs/2304.10592) (Zhu et al., 2023)",
        summary="a frozen EVA ViT-g/14 and BLIP-2 Q-Former turn an image into {image_tokens} soft tokens through one "
        "trained linear projection, and a frozen {llm} answers about them.",
        tags=("minigpt4", "vision-language", "blip-2", "vicuna", "llama", "custom_code"),
        stops="at the end of the assistant turn (`###`), row by row in a batch",
    ),
    "llama2": VariantCard(
        title="MiniGPT-4",
        paper="[MiniGPT-4](https://arxiv.org/abs/2304.10592) (Zhu et al., 2023), its Llama-2 release",
        summary="a frozen EVA ViT-g/14 turns an image into patch tokens, every 4 consecutive ones are concatenated "
        "into {image_tokens} image tokens, one trained linear projection maps them to the language model, and a "
        "frozen {llm} answers about them.",
        tags=("minigpt4", "vision-language", "llama-2", "llama", "custom_code"),
        stops="at Llama-2's end of sequence (or `###`, as the original demo asked), row by row in a batch",
    ),
    "v2": VariantCard(
        title="MiniGPT-v2",
        paper="[MiniGPT-v2](https://arxiv.org/abs/2310.09478) (Chen et al., 2023)",
        summary="a frozen EVA ViT-g/14 reads a 448 px image, every 4 consecutive patch tokens are concatenated into "
        "{image_tokens} image tokens, a trained linear projection maps them to {llm} (with LoRA on its attention), "
        "and task identifiers such as `[refer]` ask for answers with bounding boxes in the text.",
        tags=("minigpt4", "minigpt-v2", "vision-language", "visual-grounding", "llama-2", "llama", "custom_code"),
        stops="at Llama-2's end of sequence, row by row in a batch",
    ),
}

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ paper }} as a transformers model: {{ summary }} Converted from the original checkpoint files into one folder that
loads with `AutoModelForImageTextToText` and `AutoProcessor` (`trust_remote_code=True`).

## Usage

```python
{{ usage_snippet }}
```

`generation_config.json` holds the original demo's defaults ({{ generation_defaults }}); pass `do_sample=False` for
greedy answers. Generation stops {{ stops }}.

The code in this repository runs on {{ transformers_support }}.
{% if tasks %}
## Tasks and boxes

Start the question with a task identifier (or pass `task=` to `apply_chat_template`), as the original was trained:

| identifier | asks for | example |
|---|---|---|
{% for task in tasks -%}
| `[{{ task[0] }}]` | {{ task[1] }} | `{{ task[2] }}` |
{% endfor %}
Boxes are written in the text as `{<x1><y1><x2><y2>}`: left, top, right, bottom as integers on a 0-100 grid of the
original image. A phrase and its boxes read `<p>phrase</p> {<..>}`, several boxes of one phrase joined by `<delim>`.
`processor.post_process_grounding(answers, image_sizes)` turns answers into phrases with pixel boxes (malformed box
text is reported in `.problems`, never raised), and `processor.format_box(box, image_size)` writes a pixel box as
that text, for `[identify]` questions.
{% endif %}
## Architecture

| part | original name -> here | size |
|---|---|---|
{% for row in architecture -%}
| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} |
{% endfor %}
The image token (id {{ image_token_id }}) lies outside the language model's vocabulary: its embedding table is the
original one. Generation stops on the token sequences {{ stop_token_ids }}. Weights are stored in
{{ dtype }}{{ dtype_note }}.

## Memory

Built from this checkpoint's config on the meta device (`minigpt4_hf/memory_table.py`); the load flags are those of
`minigpt4-chat`, `minigpt4-caption` and `minigpt4-demo`.

{{ memory_tables }}

## Provenance

Converted with `minigpt4-convert` (transformers {{ transformers_version }}, torch
{{ torch_version }}, Python {{ python_version }}) from:

| input | file | bytes | sha256 |
|---|---|---|---|
{% for record in inputs -%}
| `{{ record.flag }}` | `{{ record.name }}` | {{ record.size }} | `{{ record.sha256 }}` |
{% endfor %}
{% if notes %}
{% for note in notes -%}
- {{ note }}
{% endfor %}
{% endif %}
## Parity with the original

{{ parity_statement }}

## Limitations

{% for item in limitations -%}
- {{ item }}
{% endfor %}
## License

{{ license_note }}
"""


@dataclass(frozen=True)
class InputRecord:
    """One input file of a conversion, for the provenance table."""

    flag: str
    path: Path
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, with a progress bar for large ones."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=None if size > 1 << 28 else True
    ) as progress:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def record_inputs(flag: str, paths: list[Path]) -> list[InputRecord]:
    return [InputRecord(flag, Path(path), Path(path).stat().st_size, sha256_of_file(path)) for path in paths]


def original_generation_config(tokenizer, variant: str = "vicuna0") -> GenerationConfig:
    """The generation defaults of the variant's original demo, with the tokenizer's special-token ids."""
    return GenerationConfig(
        **GENERATION_DEFAULTS[variant],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def usage_snippet(model_id: str, variant: str = "vicuna0") -> str:
    """
    Python code that loads the checkpoint and answers about one image (`image_path` is the one line to edit); for
    MiniGPT-v2 a `[refer]` question whose answer's boxes are read in pixels.
    """
    question, task, max_new_tokens = "Describe this image in detail.", "", 300
    if variant == "v2":
        question, task, max_new_tokens = "the largest object", ', task="refer"', 500
    code = f'''from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{model_id}"
image_path = "example.jpg"  # any image

processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype="auto", device_map="auto")

image = Image.open(image_path)
question = "{question}"
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True{task})
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
generated_ids = model.generate(**inputs, max_new_tokens={max_new_tokens})
answer = processor.decode_answers(generated_ids, prompt_length=inputs["input_ids"].shape[1])[0]
print(answer)'''
    if variant == "v2":
        code += '''
for found in processor.post_process_grounding([answer], [image.size])[0]:
    print(found["phrase"], found["box"])  # the box in pixels of the image: (left, top, right, bottom)'''
    return code


def language_model_name(config: MiniGPT4Config) -> str | None:
    """The released language model the shapes identify (Vicuna-7B/13B v0, Llama-2-7B-chat), or None."""
    text = config.text_config
    if config.variant == "vicuna0":
        known = KNOWN_LANGUAGE_MODELS.get(text.hidden_size)
        return known[0] if known and text.vocab_size == 32001 else None
    return LLAMA2_CHAT[0] if text.hidden_size == 4096 and text.vocab_size == 32000 else None


def default_base_models(config: MiniGPT4Config, blip2_source: str | None = None) -> list[str]:
    """
    Hub ids of the parts, where the shapes identify them: the real ViT-g (and Q-Former) of BLIP-2, Vicuna-7B/13B v0
    or Llama-2-7B-chat.
    """
    base = []
    if blip2_source and not Path(blip2_source).exists():
        base.append(blip2_source)
    elif config.vision_config.hidden_size == 1408 and (not config.use_qformer or config.qformer_config.hidden_size == 768):
        base.append(BLIP2_HUB_ID)
    if config.variant == "vicuna0":
        known = KNOWN_LANGUAGE_MODELS.get(config.text_config.hidden_size)
        if known and config.text_config.vocab_size == 32001:
            base.append(known[1])
    elif language_model_name(config):
        base.append(LLAMA2_CHAT[1])
    return base


def _count(parameter_counts: dict[str, int], prefix: str | tuple[str, ...]) -> str:
    total = sum(count for name, count in parameter_counts.items() if name.startswith(prefix))
    return f"{total / 1e6:,.1f} M" if total >= 1e5 else f"{total:,}"


def _projection_in_features(config: MiniGPT4Config) -> int:
    if config.use_qformer:
        return config.qformer_config.hidden_size
    return config.vision_token_merge * config.vision_config.hidden_size


def _bridge_row(config: MiniGPT4Config, parameter_counts: dict[str, int]) -> tuple[str, str, str]:
    """The part between the ViT and the projection: the Q-Former, or the merge of consecutive patch tokens."""
    if not config.use_qformer:
        return (
            "token merge",
            "`encode_img` (no Q-Former)",
            f"class token dropped, every {config.vision_token_merge} consecutive patch tokens concatenated: "
            f"{config.num_image_tokens} image tokens; no weights",
        )
    qformer = config.qformer_config
    return (
        "Q-Former",
        "`Qformer.bert` -> `qformer`, `query_tokens`",
        f"{qformer.num_hidden_layers} layers, width {qformer.hidden_size}, {qformer.num_attention_heads} heads, "
        f"cross-attention every {qformer.cross_attention_frequency} layers, {config.num_query_tokens} queries; "
        f"{_count(parameter_counts, 'model.qformer.')} parameters",
    )


def architecture_rows(config: MiniGPT4Config, parameter_counts: dict[str, int]) -> list[tuple[str, str, str]]:
    vision, text = config.vision_config, config.text_config
    grid = vision.image_size // vision.patch_size
    return [
        ("image", "-", f"{vision.image_size} px, {vision.patch_size} px patches: {grid}x{grid} + 1 class token"),
        (
            "ViT",
            "`visual_encoder` (EVA ViT-g) -> `vision_model`",
            f"{vision.num_hidden_layers} blocks, width {vision.hidden_size}, {vision.num_attention_heads} heads, "
            f"MLP {vision.intermediate_size}, q/v bias, no final norm; "
            f"{_count(parameter_counts, 'model.vision_model.')} parameters",
        ),
        ("ln_vision", "`ln_vision` -> `vision_model.post_layernorm`", f"LayerNorm, eps {config.vision_layernorm_eps}"),
        _bridge_row(config, parameter_counts),
        (
            "projection",
            "`llama_proj` -> `language_projection`",
            f"Linear {_projection_in_features(config)} -> {text.hidden_size} "
            + ("(trained together with the LoRA)" if config.variant == "v2" else "(the only part MiniGPT-4 trained)"),
        ),
        (
            "language model",
            f"`llama_model` ({language_model_name(config) or 'LLaMA'}) -> `language_model` + `lm_head`",
            f"{text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
            f"{text.num_attention_heads} heads, vocabulary {text.vocab_size}; "
            f"{_count(parameter_counts, ('model.language_model.', 'lm_head.'))} parameters",
        ),
    ]


def build_model_card(
    config: MiniGPT4Config,
    model_id: str,
    inputs: list[InputRecord],
    dtype: torch.dtype,
    parameter_counts: dict[str, int],
    base_models: list[str],
    notes: list[str] = (),
) -> ModelCard:
    """
    The model card of `config.variant`: Hub metadata (the Llama 2 licence for the Llama-2 variants), usage that runs,
    MiniGPT-v2's tasks and box format, architecture, memory per load mode, provenance, parity, limitations, licence.
    """
    from minigpt4_hf.memory_table import memory_tables

    variant = VARIANT_CARDS[config.variant]
    llm_name = language_model_name(config)
    model_name = f"{variant.title} ({llm_name})" if llm_name else variant.title
    licence = {"license": "other", "license_name": "llama-and-vicuna-v0-non-commercial"}
    if config.variant != "vicuna0":
        licence = {"license": "llama2"}
    card_data = ModelCardData(
        model_name=model_name,
        base_model=list(base_models) or None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(variant.tags),
        language=["en"],
        **licence,
    )
    dtype_name = str(dtype).removeprefix("torch.")
    generation_defaults = GENERATION_DEFAULTS[config.variant]
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        paper=variant.paper,
        summary=variant.summary.format(image_tokens=config.num_image_tokens, llm=llm_name or "LLaMA"),
        usage_snippet=usage_snippet(model_id, config.variant),
        generation_defaults=", ".join(f"{key} {value}" for key, value in generation_defaults.items()),
        stops=variant.stops,
        tasks=V2_TASKS if config.variant == "v2" else (),
        architecture=architecture_rows(config, parameter_counts),
        image_token_id=config.image_token_id,
        stop_token_ids=config.stop_token_ids,
        dtype=dtype_name,
        dtype_note=" (the Q-Former and query tokens in float32)" if dtype == torch.float16 and config.use_qformer
        else "",
        memory_tables=memory_tables({model_name: config}),
        transformers_version=transformers.__version__,
        transformers_support=supported_transformers_text(),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        inputs=inputs,
        notes=list(notes),
        parity_statement=PARITY_STATEMENTS[config.variant],
        limitations=LIMITATIONS[config.variant],
        license_note=LICENSE_NOTES[config.variant],
    )
