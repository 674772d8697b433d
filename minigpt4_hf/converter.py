"""
The conversion run behind `minigpt4-convert` (`minigpt4_hf/cli/convert.py` parses and checks the flags first): reads
the original checkpoints memory-mapped, detects the variant, plans every tensor of the HF layout (LoRA merged or kept
as an adapter, position embeddings resized, the Vicuna v0 delta applied), checks the plan against the model, and
writes one Hub-ready folder through a temporary folder and a rename.
"""

import argparse
import math
import shutil
from pathlib import Path

import torch
from huggingface_hub import HfApi
from minigpt4_hf.files import atomic_path
from minigpt4_hf.model_card import build_model_card, default_base_models, original_generation_config, record_inputs
from minigpt4_hf.conversion import (
    BLIP2_KEPT_PREFIXES,
    CHECKPOINT_SIDE_FILES,
    KINDS,
    LLAMA_BASE_KIND,
    VICUNA_DELTA_KIND,
    ConversionError,
    check_against_model,
    check_vocabulary_fits_variant,
    derive_config,
    detect_variant,
    download_blip2_parts,
    download_checkpoint,
    drop_qformer_parts,
    plan_conversion,
    plan_default_layernorm,
    plan_lora,
    plan_lora_merge,
    save_lora_adapter,
    split_lora_tensors,
    read_config_overrides,
    read_torch_checkpoint,
    read_transformers_weights,
    read_vicuna_delta,
    save_sharded_safetensors,
    summarize_ignored,
    text_config_dict,
)
from transformers import AutoConfig, AutoTokenizer

import configuration_minigpt4
import modeling_minigpt4
import processing_minigpt4
from processing_minigpt4 import (
    CHAT_TEMPLATES,
    MiniGPT4Processor,
    sentencepiece_faithful_tokenizer,
    variant_stop_token_ids,
)




# The PEFT adapter's folder inside --output-dir (`--lora adapter`).
ADAPTER_DIR = "adapter"
CODE_MODULES = (configuration_minigpt4, modeling_minigpt4, processing_minigpt4)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UploadError(RuntimeError):
    """The finished folder could not be uploaded to the Hub (the folder itself is complete)."""


def read_vision_inputs(args: argparse.Namespace):
    """`(inputs, base config, [(flag, files read)])` of the ViT + Q-Former part: two LAVIS files or one BLIP-2."""
    if args.blip2:
        local = Path(args.blip2)
        folder = local if local.exists() else download_blip2_parts(args.blip2)
        blip2 = read_transformers_weights(folder, KINDS["blip2"], keep=lambda key: key.startswith(BLIP2_KEPT_PREFIXES))
        try:
            blip2_config = AutoConfig.from_pretrained(folder)
            base = {
                "vision_config": blip2_config.vision_config.to_dict(),
                "qformer_config": blip2_config.qformer_config.to_dict(),
            }
        except Exception as error:  # noqa: BLE001
            raise ConversionError(f"--blip2 {args.blip2}: cannot read its config.json ({error}).") from None
        print(f"--blip2 {args.blip2}: taking {', '.join(BLIP2_KEPT_PREFIXES)}*; BLIP-2's own language model and "
              "language_projection are not read.")
        return [blip2], base, [("--blip2", [folder / "config.json", *blip2.paths])]
    vit = read_torch_checkpoint(args.vit_checkpoint, KINDS["vit"], args.allow_unsafe_pickle)
    if not args.qformer_checkpoint:
        return [vit], {}, [("--vit-checkpoint", vit.paths)]
    qformer = read_torch_checkpoint(args.qformer_checkpoint, KINDS["qformer"], args.allow_unsafe_pickle)
    return [vit, qformer], {}, [("--vit-checkpoint", vit.paths), ("--qformer-checkpoint", qformer.paths)]


def read_language_model(args: argparse.Namespace):
    """
    `(weights, config dict, tokenizer, [(flag, files read)])` of the language model: the `--llm` folder, or Vicuna v0
    built from `--llama-base` + `--vicuna-delta` (the base's config, the delta's tokenizer, as FastChat saved them).
    """
    if args.llm:
        llm_dir = Path(args.llm)
        weights = read_transformers_weights(llm_dir, KINDS["llm"])
        config_dir, tokenizer_dir = llm_dir, llm_dir
        config_flag = tokenizer_flag = f"--llm {llm_dir}"
        files_read = [("--llm", sorted(path for path in llm_dir.iterdir() if path.is_file()))]
    else:
        base_dir = Path(args.llama_base)
        local = Path(args.vicuna_delta)
        delta_dir = local if local.exists() else download_checkpoint(
            args.vicuna_delta, "--vicuna-delta", side_files=CHECKPOINT_SIDE_FILES
        )
        base = read_transformers_weights(base_dir, LLAMA_BASE_KIND)
        delta = read_transformers_weights(delta_dir, VICUNA_DELTA_KIND)
        weights = read_vicuna_delta(base, delta)
        config_dir, config_flag = base_dir, f"--llama-base {base_dir}"
        tokenizer_dir, tokenizer_flag = delta_dir, f"--vicuna-delta {args.vicuna_delta}"
        files_read = [("--llama-base", base.paths), ("--vicuna-delta", delta.paths)]
        print(f"Building Vicuna v0 from --llama-base {base_dir} + --vicuna-delta {args.vicuna_delta} "
              "(float16, as FastChat's apply_delta) while writing.")
    try:
        text_config = text_config_dict(AutoConfig.from_pretrained(config_dir))
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"{config_flag}: cannot read its config.json ({error}).") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"{tokenizer_flag}: cannot load its tokenizer ({type(error).__name__}: {error}). A folder with only "
            "tokenizer.model needs `pip install sentencepiece protobuf`."
        ) from None
    return weights, text_config, tokenizer, files_read


def check_vocabulary(tokenizer, plan, llm_flag: str) -> int:
    """Returns the embedding rows; raises when the tokenizer does not fit them (the Vicuna v0 / v1.1 trap)."""
    embedding_keys = [key for key in plan.tensors if key.startswith("model.language_model.") and "embed_tokens" in key]
    if not embedding_keys:
        raise ConversionError(plan.missing_message(["model.language_model.embed_tokens.weight"]))
    embedding = plan.tensors[embedding_keys[0]]
    rows = embedding.shape[0]
    if len(tokenizer) != rows:
        raise ConversionError(
            f"{llm_flag}: the tokenizer has {len(tokenizer)} tokens but the embedding "
            f"({embedding.describe()}) has {rows} rows. They must match: MiniGPT-4 was trained with Vicuna v0, whose "
            "vocabulary is 32001 (LLaMA's 32000 + '[PAD]'); Vicuna v1.1 and later have 32000. Use the tokenizer that "
            "came with these weights (for v0, with its added_tokens.json), and the Vicuna version MiniGPT-4 expects."
        )
    return rows


def convert(args: argparse.Namespace) -> Path:
    """Runs the conversion; returns the finished output folder."""
    output_dir = Path(args.output_dir).absolute()
    if output_dir.exists() and not args.overwrite_output_dir:
        raise ConversionError(f"--output-dir {output_dir} exists; pass --overwrite-output-dir to replace it.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output-dir {output_dir} is a file, not a folder.")
    overrides = read_config_overrides(args.config_overrides)
    dtype = DTYPES["float16" if args.dtype == "auto" else args.dtype]  # auto: the dtype the original ran in

    print("Reading the input files ...")
    vision_inputs, base, files_read = read_vision_inputs(args)
    projection = read_torch_checkpoint(args.projection_checkpoint, KINDS["projection"], args.allow_unsafe_pickle)
    lora_tensors = split_lora_tensors(projection)
    language_model, text_config, tokenizer, llm_files = read_language_model(args)
    plan = plan_conversion([*vision_inputs, projection, language_model])

    variant = detect_variant(plan, has_lora=bool(lora_tensors), requested=args.variant,
                             merge=overrides.get("vision_token_merge", 4))
    print(f"Variant: {variant}" + (" (--variant)" if args.variant else " (read from the projection checkpoint)"))
    if variant == "vicuna0" and "model.query_tokens" not in plan.tensors:
        raise ConversionError(
            f"--projection-checkpoint {args.projection_checkpoint} is MiniGPT-4 with Vicuna, which needs the BLIP-2 "
            "Q-Former: pass --qformer-checkpoint blip2_pretrained_flant5xxl.pth (or --blip2)."
        )
    if variant != "vicuna0":
        drop_qformer_parts(plan)
        plan_default_layernorm(plan)
    lora = plan_lora(plan, lora_tensors, alpha=_whole_if_integral(args.lora_alpha))
    if lora is not None and args.lora == "merge":
        plan_lora_merge(plan, lora)

    text_config["vocab_size"] = check_vocabulary(tokenizer, plan, language_model.origin)
    check_vocabulary_fits_variant(text_config["vocab_size"], variant, language_model.origin)
    tokenizer = sentencepiece_faithful_tokenizer(tokenizer)
    config = derive_config(
        plan, text_config, overrides, base=base, variant=variant,
        stop_token_ids=variant_stop_token_ids(tokenizer, variant),
    )
    names = check_against_model(plan, config)
    processor = MiniGPT4Processor.from_tokenizer(
        tokenizer, image_size=config.vision_config.image_size, num_image_tokens=config.num_image_tokens,
        chat_template=CHAT_TEMPLATES[variant],
    )
    config.image_token_id = processor.image_token_id
    config.architectures = ["MiniGPT4ForConditionalGeneration"]
    config.dtype = dtype
    if lora is not None and args.lora == "adapter":
        plan.notes.append(
            f"LoRA (rank {lora.rank}, alpha {lora.alpha:g}) written as a PEFT adapter into {ADAPTER_DIR}/ "
            f"({len(lora.modules)} modules: {', '.join(lora.target_modules)}); the language model is the base model."
        )
    for line in plan.notes + summarize_ignored(plan.ignored):
        print(line)

    # Provenance: hashed only once every check has passed (the real inputs are tens of GB).
    files_read += [("--projection-checkpoint", projection.paths), *llm_files]
    records = [record for flag, paths in files_read for record in record_inputs(flag, paths)]
    parameter_counts = {name: math.prod(plan.tensors[name].shape) for name in names}
    card = build_model_card(
        config,
        model_id=args.push_to_hub or str(output_dir),
        inputs=records,
        dtype=dtype,
        parameter_counts=parameter_counts,
        base_models=args.base_model or default_base_models(config, args.blip2),
        notes=plan.notes,
    )
    keep_in_fp32 = tuple(modeling_minigpt4.MiniGPT4PreTrainedModel._keep_in_fp32_modules)

    def dtype_of(name: str) -> torch.dtype:
        if dtype == torch.float16 and name.removeprefix("model.").split(".")[0] in keep_in_fp32:
            return torch.float32  # loaded back in float32 anyway (`_keep_in_fp32_modules`); keep the precision
        return dtype

    print(f"Writing {len(names)} tensors ({sum(parameter_counts.values()) / 1e6:,.1f} M parameters, {args.dtype}) ...")
    with atomic_path(output_dir, directory=True) as staging:
        save_sharded_safetensors(plan, names, staging, dtype_of, args.max_shard_size)
        config.save_pretrained(staging)
        original_generation_config(processor.tokenizer, variant).save_pretrained(staging)
        if lora is not None and args.lora == "adapter":
            save_lora_adapter(lora, staging / ADAPTER_DIR, dtype)
        processor.save_pretrained(staging)
        for module in CODE_MODULES:
            shutil.copy(module.__file__, staging / Path(module.__file__).name)
        card.save(staging / "README.md")
        if output_dir.exists() and not args.overwrite_output_dir:  # appeared while converting
            raise ConversionError(f"--output-dir {output_dir} exists; pass --overwrite-output-dir to replace it.")
    print(f"Saved to {output_dir}")
    return output_dir


def push_to_hub(folder: Path, repo_id: str, private: bool) -> None:
    """Creates the Hub repository (if needed) and uploads the finished folder."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message="MiniGPT-4 converted from the original checkpoints",
        )
    except Exception as error:  # noqa: BLE001 (network, authentication, permissions)
        raise UploadError(
            f"--push-to-hub {repo_id}: the upload failed ({type(error).__name__}: {error}). The converted folder "
            f"{folder} is complete; retry with `hf upload {repo_id} {folder}`."
        ) from None
    print(f"Uploaded to https://huggingface.co/{repo_id}")


def _whole_if_integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
