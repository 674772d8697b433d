"""The main job, end to end: build a tiny MiniGPT-4, save it, reload it as a user would, ask about an image.

No real weights can be downloaded here, so the model is a TINY RANDOMLY INITIALISED MiniGPT-4: its answer is
gibberish. Everything else is the code path a converted real checkpoint takes: save_pretrained (safetensors, remote
code, processor, chat template) -> AutoModelForImageTextToText / AutoProcessor with trust_remote_code=True ->
apply_chat_template -> generate -> decode.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from minigpt4_hf.random_models import EXAMPLE_IMAGE, build_random_model


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/tiny-minigpt4", help="where the tiny model is saved")
    parser.add_argument("--image", default=str(EXAMPLE_IMAGE), help="image to ask about")
    parser.add_argument("--question", default="Describe this image in detail.")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)

    print("Building a TINY RANDOMLY INITIALISED MiniGPT-4 (no real weights here: expect a gibberish answer).")
    model, processor = build_random_model("tiny", seed=0)
    output_dir = Path(args.output_dir)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".", dir=output_dir.parent if output_dir.parent.exists()
                                    else None))
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), output_dir)
    print(f"Saved to {output_dir}: {', '.join(sorted(os.listdir(output_dir)))}")

    print("Reloading with AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True) ...")
    model = AutoModelForImageTextToText.from_pretrained(output_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(args.image), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])[0]
    print(f"Prompt: {prompt!r}")
    print(f"Question: {args.question}")
    print(f"Answer (random weights): {answer!r}")
    return answer



def cli() -> None:
    """Console entry point `minigpt4-quickstart`."""
    main()


if __name__ == "__main__":
    cli()
