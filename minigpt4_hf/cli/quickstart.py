"""
The main job, end to end: build a tiny MiniGPT-4, save it, reload it as a user would, ask about an image.

    minigpt4-quickstart                                  # writes outputs/tiny-minigpt4
    minigpt4-quickstart --output-dir /tmp/tiny --prompt "What is in the picture?"

No real weights can be downloaded here, so the model is a TINY RANDOMLY INITIALISED MiniGPT-4: its answer is
gibberish. Everything else is the code path a converted real checkpoint takes: save_pretrained (safetensors, remote
code, processor, chat template) -> AutoModelForImageTextToText / AutoProcessor with trust_remote_code=True ->
apply_chat_template -> generate -> decode. The output folder is written whole or not at all, and replaces the one
an earlier quickstart wrote.
"""

import argparse
import os

from minigpt4_hf.cli.options import CommandLineParser, console_entry_point, positive_int
from minigpt4_hf.inputs import check_image_file
from minigpt4_hf.random_models import EXAMPLE_IMAGE


PROG = "minigpt4-quickstart"
DEFAULT_PROMPT = "Describe this image in detail."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    parser.add_argument("--output-dir", default="outputs/tiny-minigpt4",
                        help="Where the tiny model is saved (default: %(default)s).")
    parser.add_argument("--image", default=str(EXAMPLE_IMAGE),
                        help="The image to ask about (default: the bundled example.jpg).")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="The question (default: %(default)r).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=20,
                        help="Most tokens generated (default: %(default)s).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Runs the main job; returns the answer."""
    args = parse_args(argv)
    check_image_file(args.image)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from minigpt4_hf.files import atomic_path
    from minigpt4_hf.random_models import build_random_model
    from processing_minigpt4 import load_rgb_image

    print("Building a TINY RANDOMLY INITIALISED MiniGPT-4 (no real weights here: expect a gibberish answer).")
    model, processor = build_random_model("tiny", seed=0)
    with atomic_path(args.output_dir, directory=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    print(f"Saved to {args.output_dir}: {', '.join(sorted(os.listdir(args.output_dir)))}")

    print("Reloading with AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True) ...")
    model = AutoModelForImageTextToText.from_pretrained(args.output_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.output_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=load_rgb_image(args.image), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])[0]
    print(f"Prompt: {prompt!r}")
    print(f"Question: {args.prompt}")
    print(f"Answer (random weights): {answer!r}")
    return answer


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
