#!/usr/bin/env python
"""
Converts the original MiniGPT-4 checkpoints into one Hub-ready folder that loads with the Auto classes.

    minigpt4-convert \\
        --vit-checkpoint eva_vit_g.pth \\
        --qformer-checkpoint blip2_pretrained_flant5xxl.pth \\
        --llm vicuna-13b-v0/ \\
        --projection-checkpoint pretrained_minigpt4.pth \\
        --output-dir minigpt4-vicuna-13b

`--blip2 Salesforce/blip2-flan-t5-xxl` (or a local BLIP-2 folder) replaces the first two files, and
`--llama-base llama-13b/ --vicuna-delta lmsys/vicuna-13b-delta-v0` replaces `--llm` (Vicuna v0 is built from LLaMA
and the delta while converting). MiniGPT-4 with Llama-2 and MiniGPT-v2 need no Q-Former file:

    minigpt4-convert \\
        --vit-checkpoint eva_vit_g.pth \\
        --llm Llama-2-7b-chat-hf/ \\
        --projection-checkpoint minigptv2_checkpoint.pth \\
        --output-dir minigpt-v2

The family (`--variant vicuna0|llama2|v2`) is read from the projection checkpoint; MiniGPT-v2's LoRA is merged into
the language model (`--lora merge`) or written as a PEFT adapter into `adapter/` (`--lora adapter`). The output holds
`config.json` (with `auto_map`), `generation_config.json` (the original chat defaults), sharded safetensors, the
processor and tokenizer (with the chat template), the three code files and a model card (`README.md`). Inputs are
read memory-mapped and written tensor by tensor, so memory stays bounded whatever the model size. The output is
written into a temporary folder next to `--output-dir` and renamed at the end, so a failed run leaves nothing behind.
"""

import argparse
import sys
from pathlib import Path

from minigpt4_hf.cli.options import EXIT_FAILED, CommandLineParser, UserError, console_entry_point, run_reporting_errors
from minigpt4_hf.inputs import DTYPE_CHOICES, check_file, check_folder, looks_like_hub_id
from minigpt4_hf.recipe import RELEASED_LORA_ALPHA, TRAINING_PRESETS


PROG = "minigpt4-convert"
# The PEFT adapter's folder inside --output-dir (`--lora adapter`).
ADAPTER_DIR = "adapter"
# What a Vicuna delta on the Hub is fetched with besides its weights (the tokenizer comes from the delta).
DELTA_SIDE_FILES = (
    "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)


class UploadError(RuntimeError):
    """The finished folder could not be uploaded to the Hub (the folder itself is complete)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    sources = parser.add_argument_group("inputs")
    sources.add_argument("--vit-checkpoint", help="eva_vit_g.pth (LAVIS EVA ViT-g, bare keys) (default: none)")
    sources.add_argument(
        "--qformer-checkpoint", help="blip2_pretrained_flant5xxl.pth ({'model': {Qformer.bert.*, query_tokens, ...}}); "
        "MiniGPT-4 with Vicuna only (MiniGPT-4 with Llama-2 and MiniGPT-v2 have no Q-Former) (default: none)"
    )
    sources.add_argument(
        "--blip2", metavar="PATH_OR_ID",
        help="a transformers BLIP-2 checkpoint (folder or Hub id, e.g. Salesforce/blip2-flan-t5-xxl) giving the ViT, "
        "ln_vision, Q-Former and query tokens instead of --vit-checkpoint and --qformer-checkpoint (default: none)",
    )
    sources.add_argument("--llm", metavar="DIR", help="Vicuna v0 / Llama-2-7B-chat folder (transformers format) with "
                         "its tokenizer (default: none: --llama-base and --vicuna-delta)")
    sources.add_argument("--llama-base", metavar="DIR",
                         help="LLaMA folder (transformers format) to build Vicuna v0 from, with --vicuna-delta, "
                         "instead of --llm (default: none)")
    sources.add_argument("--vicuna-delta", metavar="DIR_OR_ID",
                         help="the Vicuna v0 delta (folder or Hub id: lmsys/vicuna-7b-delta-v0, "
                         "lmsys/vicuna-13b-delta-v0) added to --llama-base; its tokenizer is used (default: none)")
    sources.add_argument("--projection-checkpoint", required=True,
                         help="pretrained_minigpt4.pth / prerained_minigpt4_7b.pth / pretrained_minigpt4_llama2_7b.pth "
                         "/ minigptv2_checkpoint.pth ({'model': {llama_proj.*, LoRA tensors}})")
    variant = parser.add_argument_group("variant")
    variant.add_argument("--variant", choices=list(TRAINING_PRESETS),
                         help="the released family: vicuna0 (MiniGPT-4 with Vicuna v0), llama2 (MiniGPT-4 with "
                         "Llama-2-7B-chat) or v2 (MiniGPT-v2) (default: read from the projection checkpoint: input "
                         "width 768 -> vicuna0; 4 x ViT width -> llama2, or v2 with LoRA tensors)")
    variant.add_argument("--lora", choices=("merge", "adapter"), default="merge",
                         help="what to do with the checkpoint's LoRA tensors (MiniGPT-v2): merge them into the "
                         "language model's weights (in float32, then cast), or write them as a PEFT adapter into "
                         f"OUTPUT_DIR/{ADAPTER_DIR} (load it with model.load_adapter or PeftModel.from_pretrained) "
                         "(default: %(default)s)")
    variant.add_argument("--lora-alpha", type=float, default=RELEASED_LORA_ALPHA,
                         help="LoRA alpha (not stored in the checkpoint; the rank is read from the shapes) (default: "
                         "%(default)s, the released MiniGPT-v2's)")
    sources.add_argument("--allow-unsafe-pickle", action="store_true",
                         help="load .pth files that pickle more than tensors, only for files you trust (default: off)")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", required=True, metavar="DIR", help="the folder to write (refused if it exists)")
    output.add_argument("--overwrite-output-dir", "--overwrite", action="store_true",
                        help="replace an existing --output-dir, once the new one is complete (default: off)")
    output.add_argument("--config-overrides", metavar="JSON_FILE",
                        help="MiniGPT4Config fields (sub-configs as nested objects) for what shapes cannot tell, "
                        'e.g. {"vision_config": {"num_attention_heads": 16}} (default: none)')
    output.add_argument("--dtype", choices=DTYPE_CHOICES, default="float16",
                        help="dtype of the saved weights; auto = float16, the dtype the original ran its ViT and "
                        "language model in (default: %(default)s)")
    output.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB or 500MB (default: %(default)s)")
    output.add_argument("--base-model", action="append", metavar="HUB_ID",
                        help="base_model entry of the model card, repeat for several (default: guessed from shapes)")
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID",
                     help="upload the finished folder to this Hub repository (default: none)")
    hub.add_argument("--private", action="store_true", help="create the Hub repository as private (default: off)")
    args = parser.parse_args(argv)

    if args.blip2 and (args.vit_checkpoint or args.qformer_checkpoint):
        parser.error("--blip2 replaces --vit-checkpoint and --qformer-checkpoint; pass one or the other.")
    if not args.blip2 and not args.vit_checkpoint:
        parser.error("pass --vit-checkpoint (and --qformer-checkpoint for MiniGPT-4 with Vicuna), or --blip2.")
    if args.lora_alpha <= 0:
        parser.error(f"--lora-alpha must be positive, got {args.lora_alpha:g}.")
    if args.llm and (args.llama_base or args.vicuna_delta):
        parser.error("--llama-base and --vicuna-delta build the language model that --llm would give; pass one or "
                     "the other.")
    if not args.llm and not (args.llama_base and args.vicuna_delta):
        parser.error("pass --llm (a Vicuna v0 or Llama-2-7B-chat folder), or --llama-base with --vicuna-delta to "
                     "build Vicuna v0.")
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub.")
    return args


def check_conversion_inputs(args: argparse.Namespace) -> None:
    """The input files and folders exist and the output folder may be written (before anything heavy is imported)."""
    for flag, path in (("--vit-checkpoint", args.vit_checkpoint), ("--qformer-checkpoint", args.qformer_checkpoint),
                       ("--projection-checkpoint", args.projection_checkpoint),
                       ("--config-overrides", args.config_overrides)):
        if path is not None:
            check_file(path, flag)
    for flag, path in (("--llm", args.llm), ("--llama-base", args.llama_base)):
        if path is not None:
            check_folder(path, flag)
    for flag, path in (("--blip2", args.blip2), ("--vicuna-delta", args.vicuna_delta)):
        if path is not None and not (Path(path).exists() or looks_like_hub_id(path)):
            check_folder(path, flag)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file, not a folder.")
    if output_dir.exists() and not args.overwrite_output_dir:
        raise UserError(f"--output-dir {output_dir} exists; pass --overwrite-output-dir to replace it.")
    from huggingface_hub import split_torch_state_dict_into_shards  # parses sizes; imports no torch

    try:
        split_torch_state_dict_into_shards({}, max_shard_size=args.max_shard_size)
    except ValueError as error:
        raise UserError(f"--max-shard-size {args.max_shard_size!r}: {error}") from None


def read_vision_inputs(args: argparse.Namespace):
    """`(inputs, base config, [(flag, files read)])` of the ViT + Q-Former part: two LAVIS files or one BLIP-2."""
    from transformers import AutoConfig

    from minigpt4_hf.conversion import (
        BLIP2_KEPT_PREFIXES,
        KINDS,
        ConversionError,
        download_blip2_parts,
        read_torch_checkpoint,
        read_transformers_weights,
    )

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
    from transformers import AutoConfig, AutoTokenizer

    from minigpt4_hf.conversion import (
        KINDS,
        LLAMA_BASE_KIND,
        VICUNA_DELTA_KIND,
        ConversionError,
        download_checkpoint,
        read_transformers_weights,
        read_vicuna_delta,
        text_config_dict,
    )

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
            args.vicuna_delta, "--vicuna-delta", side_files=DELTA_SIDE_FILES
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
    from minigpt4_hf.conversion import ConversionError

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
    import math
    import shutil

    import torch

    import configuration_minigpt4
    import modeling_minigpt4
    import processing_minigpt4
    from minigpt4_hf.conversion import (
        KINDS,
        ConversionError,
        check_against_model,
        check_vocabulary_fits_variant,
        derive_config,
        detect_variant,
        drop_qformer_parts,
        plan_conversion,
        plan_default_layernorm,
        plan_lora,
        plan_lora_merge,
        read_config_overrides,
        read_torch_checkpoint,
        save_lora_adapter,
        save_sharded_safetensors,
        split_lora_tensors,
        summarize_ignored,
    )
    from minigpt4_hf.files import atomic_path
    from minigpt4_hf.model_card import build_model_card, default_base_models, original_generation_config, record_inputs
    from processing_minigpt4 import (
        CHAT_TEMPLATES,
        MiniGPT4Processor,
        sentencepiece_faithful_tokenizer,
        variant_stop_token_ids,
    )

    output_dir = Path(args.output_dir).absolute()
    overrides = read_config_overrides(args.config_overrides)
    dtype = getattr(torch, "float16" if args.dtype == "auto" else args.dtype)

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

    print(f"Writing {len(names)} tensors ({sum(parameter_counts.values()) / 1e6:,.1f} M parameters, "
          f"{str(dtype).removeprefix('torch.')}) ...")
    with atomic_path(output_dir, directory=True) as staging:
        save_sharded_safetensors(plan, names, staging, dtype_of, args.max_shard_size)
        config.save_pretrained(staging)
        original_generation_config(processor.tokenizer, variant).save_pretrained(staging)
        if lora is not None and args.lora == "adapter":
            save_lora_adapter(lora, staging / ADAPTER_DIR, dtype)
        processor.save_pretrained(staging)
        for module in (configuration_minigpt4, modeling_minigpt4, processing_minigpt4):
            shutil.copy(module.__file__, staging / Path(module.__file__).name)
        card.save(staging / "README.md")
        if output_dir.exists() and not args.overwrite_output_dir:  # appeared while converting
            raise ConversionError(f"--output-dir {output_dir} exists; pass --overwrite-output-dir to replace it.")
    print(f"Saved to {output_dir}")
    return output_dir


def push_to_hub(folder: Path, repo_id: str, private: bool) -> None:
    """Creates the Hub repository (if needed) and uploads the finished folder."""
    from huggingface_hub import HfApi

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


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (nothing written), 1 the upload failed (the converted folder is kept)."""

    def run() -> int:
        args = parse_args(argv)
        check_conversion_inputs(args)
        output_dir = convert(args)
        if args.push_to_hub:
            try:
                push_to_hub(output_dir, args.push_to_hub, args.private)
            except UploadError as error:  # the network or the Hub, not the input
                print(f"{PROG}: error: {error}", file=sys.stderr)
                return EXIT_FAILED
        return 0

    return run_reporting_errors(run, PROG)


def _whole_if_integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
