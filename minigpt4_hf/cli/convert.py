#!/usr/bin/env python
"""
Converts the original MiniGPT-4 checkpoints into one Hub-ready folder that loads with the Auto classes.

    minigpt4-convert \\
        --vit-checkpoint eva_vit_g.pth \\
        --qformer-checkpoint blip2_pretrained_flant5xxl.pth \\
        --llm vicuna-13b-v0/ \\
        --projection-checkpoint pretrained_minigpt4.pth \\
        --output-dir minigpt4-vicuna-13b

`--blip2 Salesforce/blip2-flan-t5-xxl` (or a local BLIP-2 folder) replaces the first two files. The output holds
`config.json` (with `auto_map`), `generation_config.json` (the original chat defaults), sharded safetensors, the
processor and tokenizer (with the chat template), the three code files and a model card (`README.md`). It is written
into a temporary folder next to `--output-dir` and renamed at the end, so a failed run leaves nothing behind.
"""

import argparse
import sys
from pathlib import Path

from minigpt4_hf.cli.options import EXIT_FAILED, CommandLineParser, UserError, run_main
from minigpt4_hf.inputs import DTYPE_CHOICES, check_file, check_folder, looks_like_hub_id


PROG = "minigpt4-convert"


class UploadError(RuntimeError):
    """The finished folder could not be uploaded to the Hub (the folder itself is complete)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    sources = parser.add_argument_group("inputs")
    sources.add_argument("--vit-checkpoint", help="eva_vit_g.pth (LAVIS EVA ViT-g, bare keys) (default: none)")
    sources.add_argument(
        "--qformer-checkpoint",
        help="blip2_pretrained_flant5xxl.pth ({'model': {Qformer.bert.*, query_tokens, ...}}) (default: none)",
    )
    sources.add_argument(
        "--blip2", metavar="PATH_OR_ID",
        help="a transformers BLIP-2 checkpoint (folder or Hub id, e.g. Salesforce/blip2-flan-t5-xxl) giving the ViT, "
        "ln_vision, Q-Former and query tokens instead of --vit-checkpoint and --qformer-checkpoint (default: none)",
    )
    sources.add_argument("--llm", required=True, metavar="DIR",
                         help="Vicuna v0 / LLaMA folder (transformers format) with its tokenizer")
    sources.add_argument("--projection-checkpoint", required=True,
                         help="pretrained_minigpt4.pth / prerained_minigpt4_7b.pth ({'model': {llama_proj.*}})")
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
    if not args.blip2 and not (args.vit_checkpoint and args.qformer_checkpoint):
        parser.error("pass --vit-checkpoint and --qformer-checkpoint (or --blip2).")
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub.")
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """The input files and folders exist and the output folder may be written (before anything heavy is imported)."""
    for flag, path in (("--vit-checkpoint", args.vit_checkpoint), ("--qformer-checkpoint", args.qformer_checkpoint),
                       ("--projection-checkpoint", args.projection_checkpoint),
                       ("--config-overrides", args.config_overrides)):
        if path is not None:
            check_file(path, flag)
    check_folder(args.llm, "--llm")
    if args.blip2 and not (Path(args.blip2).exists() or looks_like_hub_id(args.blip2)):
        check_folder(args.blip2, "--blip2")
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
    qformer = read_torch_checkpoint(args.qformer_checkpoint, KINDS["qformer"], args.allow_unsafe_pickle)
    return [vit, qformer], {}, [("--vit-checkpoint", vit.paths), ("--qformer-checkpoint", qformer.paths)]


def read_language_model(llm_dir: Path):
    """`(weights, config dict, tokenizer)` of the `--llm` folder."""
    from transformers import AutoConfig, AutoTokenizer

    from minigpt4_hf.conversion import KINDS, ConversionError, read_transformers_weights, text_config_dict

    weights = read_transformers_weights(llm_dir, KINDS["llm"])
    try:
        text_config = text_config_dict(AutoConfig.from_pretrained(llm_dir))
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"--llm {llm_dir}: cannot read its config.json ({error}).") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"--llm {llm_dir}: cannot load its tokenizer ({type(error).__name__}: {error}). A folder with only "
            "tokenizer.model needs `pip install sentencepiece protobuf`."
        ) from None
    return weights, text_config, tokenizer


def check_vocabulary(tokenizer, plan, llm_dir: Path) -> int:
    """Returns the embedding rows; raises when the tokenizer does not fit them (the Vicuna v0 / v1.1 trap)."""
    from minigpt4_hf.conversion import ConversionError

    embedding_keys = [key for key in plan.tensors if key.startswith("language_model.") and "embed_tokens" in key]
    if not embedding_keys:
        raise ConversionError(plan.missing_message(["language_model.model.embed_tokens.weight"]))
    embedding = plan.tensors[embedding_keys[0]]
    rows = embedding.shape[0]
    if len(tokenizer) != rows:
        raise ConversionError(
            f"--llm {llm_dir}: the tokenizer has {len(tokenizer)} tokens but the embedding "
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
        check_against_model,
        derive_config,
        plan_conversion,
        read_config_overrides,
        read_torch_checkpoint,
        save_sharded_safetensors,
        summarize_ignored,
    )
    from minigpt4_hf.files import atomic_path
    from minigpt4_hf.model_card import build_model_card, default_base_models, original_generation_config, record_inputs
    from processing_minigpt4 import MiniGPT4Processor, sentencepiece_faithful_tokenizer, stop_token_ids_for

    output_dir = Path(args.output_dir).absolute()
    overrides = read_config_overrides(args.config_overrides)
    dtype = getattr(torch, "float16" if args.dtype == "auto" else args.dtype)
    llm_dir = Path(args.llm)

    print("Reading the input files ...")
    vision_inputs, base, files_read = read_vision_inputs(args)
    projection = read_torch_checkpoint(args.projection_checkpoint, KINDS["projection"], args.allow_unsafe_pickle)
    language_model, text_config, tokenizer = read_language_model(llm_dir)
    plan = plan_conversion([*vision_inputs, projection, language_model])

    text_config["vocab_size"] = check_vocabulary(tokenizer, plan, llm_dir)
    tokenizer = sentencepiece_faithful_tokenizer(tokenizer)
    config = derive_config(plan, text_config, overrides, base=base, stop_token_ids=stop_token_ids_for(tokenizer))
    names = check_against_model(plan, config)
    processor = MiniGPT4Processor.from_tokenizer(
        tokenizer, image_size=config.vision_config.image_size, num_image_tokens=config.num_image_tokens
    )
    config.image_token_id = processor.image_token_id
    config.architectures = ["MiniGPT4ForConditionalGeneration"]
    config.dtype = dtype
    for line in plan.notes + summarize_ignored(plan.ignored):
        print(line)

    # Provenance: hashed only once every check has passed (the real inputs are tens of GB).
    files_read += [("--projection-checkpoint", projection.paths),
                   ("--llm", sorted(path for path in llm_dir.iterdir() if path.is_file()))]
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
        if dtype == torch.float16 and name.split(".")[0] in keep_in_fp32:
            return torch.float32  # loaded back in float32 anyway (`_keep_in_fp32_modules`); keep the precision
        return dtype

    print(f"Writing {len(names)} tensors ({sum(parameter_counts.values()) / 1e6:,.1f} M parameters, "
          f"{str(dtype).removeprefix('torch.')}) ...")
    with atomic_path(output_dir, directory=True) as staging:
        save_sharded_safetensors(plan, names, staging, dtype_of, args.max_shard_size)
        config.save_pretrained(staging)
        original_generation_config(processor.tokenizer).save_pretrained(staging)
        processor.save_pretrained(staging)
        for module in (configuration_minigpt4, modeling_minigpt4, processing_minigpt4):
            shutil.copy(module.__file__, staging / Path(module.__file__).name)
        card.save(staging / "README.md")
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
    """Converts; bad input raises `UserError` (exit 2), a failed upload returns 1 (the folder is kept)."""
    args = parse_args(argv)
    check_inputs(args)
    output_dir = convert(args)
    if args.push_to_hub:
        try:
            push_to_hub(output_dir, args.push_to_hub, args.private)
        except UploadError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return EXIT_FAILED
    return 0


def cli() -> None:
    """Console entry point `minigpt4-convert`."""
    run_main(main, PROG)


if __name__ == "__main__":
    cli()
