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

from minigpt4_hf.cli.options import EXIT_FAILED, CommandLineParser, UserError, console_entry_point
from minigpt4_hf.inputs import DTYPE_CHOICES, check_file, check_folder, looks_like_hub_id
from minigpt4_hf.recipe import RELEASED_LORA_ALPHA


PROG = "minigpt4-convert"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    sources = parser.add_argument_group("inputs")
    sources.add_argument("--vit-checkpoint", help="eva_vit_g.pth (LAVIS EVA ViT-g, bare keys) (default: none)")
    sources.add_argument(
        "--qformer-checkpoint", help="blip2_pretrained_flant5xxl.pth ({'model': {Qformer.bert.*, query_tokens, ...}}); "
        "MiniGPT-4 with Vicuna only: MiniGPT-4 with Llama-2 and MiniGPT-v2 have no Q-Former (default: none)"
    )
    sources.add_argument(
        "--blip2", metavar="PATH_OR_ID",
        help="a transformers BLIP-2 checkpoint (folder or Hub id, e.g. Salesforce/blip2-flan-t5-xxl) giving the ViT, "
        "ln_vision, Q-Former and query tokens instead of --vit-checkpoint and --qformer-checkpoint (default: none)",
    )
    sources.add_argument("--llm", metavar="DIR", help="Vicuna v0 / Llama-2-7B-chat folder (transformers format) with "
                         "its tokenizer (default: none)")
    sources.add_argument("--llama-base", "--llama_base", metavar="DIR",
                         help="LLaMA folder (transformers format) to build Vicuna v0 from, with --vicuna-delta, "
                         "instead of --llm (default: none)")
    sources.add_argument("--vicuna-delta", "--vicuna_delta", metavar="DIR_OR_ID",
                         help="the Vicuna v0 delta (folder or Hub id: lmsys/vicuna-7b-delta-v0, "
                         "lmsys/vicuna-13b-delta-v0) added to --llama-base; its tokenizer is used (default: none)")
    sources.add_argument("--projection-checkpoint", required=True,
                         help="pretrained_minigpt4.pth / prerained_minigpt4_7b.pth / pretrained_minigpt4_llama2_7b.pth "
                         "/ minigptv2_checkpoint.pth ({'model': {llama_proj.*, LoRA tensors}})")
    variant = parser.add_argument_group("variant")
    variant.add_argument("--variant", choices=("vicuna0", "llama2", "v2"),
                         help="the released family: vicuna0 (MiniGPT-4 with Vicuna v0), llama2 (MiniGPT-4 with "
                         "Llama-2-7B-chat) or v2 (MiniGPT-v2) (default: read from the projection checkpoint: input "
                         "width 768 -> vicuna0; 4 x ViT width -> llama2, or v2 with LoRA tensors)")
    variant.add_argument("--lora", choices=("merge", "adapter"), default="merge",
                         help="what to do with the checkpoint's LoRA tensors (MiniGPT-v2): merge them into the "
                         "language model's weights (in float32, then cast), or write them as a PEFT adapter into "
                         "OUTPUT_DIR/adapter (load it with model.load_adapter or PeftModel.from_pretrained) "
                         "(default: %(default)s)")
    variant.add_argument("--lora-alpha", type=float, default=float(RELEASED_LORA_ALPHA),
                         help="LoRA alpha: not stored in the checkpoint (the rank is read from the shapes) (default: "
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


def main(argv: list[str] | None = None) -> int:
    """
    Converts; bad input raises `UserError` (exit 2, nothing written), a failed upload returns 1 (the folder is kept).
    """
    args = parse_args(argv)
    check_conversion_inputs(args)
    from minigpt4_hf.converter import UploadError, convert, push_to_hub

    output_dir = convert(args)
    if args.push_to_hub:
        try:
            push_to_hub(output_dir, args.push_to_hub, args.private)
        except UploadError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return EXIT_FAILED
    return 0


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
