"""
Exercises a saved MiniGPT-4 folder as Hub remote code, the way a user of some transformers version would, and prints
one JSON line with what worked and what it computed.

This file is run by `minigpt4-check-transformers` with the python of a virtual environment holding only torch and one
transformers release, from an empty working directory and with `python -I`, so that nothing but the code copied into
the folder can be imported. It imports nothing from this package (only the standard library, torch, transformers and
PIL), which is what lets it run there.

    python -I remote_code_probe.py MODEL_FOLDER IMAGE_PATH

Stages, in order (a failing stage ends the run; the JSON names it and the error's last line):
    import   transformers itself
    load     AutoConfig, AutoProcessor, AutoModelForImageTextToText and AutoModel with `trust_remote_code=True`
    generate apply_chat_template + the processor call, then greedy `generate` for one prompt, for a left-padded
             batch of two (also decoded), without the cache, and with a stop sequence that ends the first row of the
             batch early (per-row stop)
    train    a forward with `labels` (processor `suffix`) in train mode, and its backward
"""

import json
import sys
import traceback


MAX_NEW_TOKENS = 8


def _error_line(error: BaseException) -> str:
    """The error as one line: `Type: message` (first line of the message)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"


def run_probe(folder: str, image_path: str) -> dict:
    """Runs the stages on `folder`; returns the report (see the module docstring)."""
    report = {"transformers": None, "stage": "import", "error": None, "traceback": None, "results": {}}
    try:
        import torch
        import transformers
        from PIL import Image
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
        from transformers.generation.streamers import BaseStreamer

        report["transformers"] = transformers.__version__
        torch.manual_seed(0)

        report["stage"] = "load"
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        report["results"]["classes"] = [type(obj).__name__ for obj in (config, processor, model, base)]
        report["results"]["remote_code"] = all(
            type(obj).__module__.startswith("transformers_modules.") for obj in (config, processor, model, base)
        )

        report["stage"] = "generate"
        image = Image.open(image_path).convert("RGB")
        questions = ["What is in this image?", "Describe the picture in a few more words than the other one."]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
            )
            for question in questions
        ]
        greedy = {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS}
        results = report["results"]
        with torch.inference_mode():
            single = processor(images=image, text=prompts[0], return_tensors="pt")
            generated = model.generate(**single, min_new_tokens=MAX_NEW_TOKENS, **greedy)
            results["greedy"] = generated[0, single["input_ids"].shape[1] :].tolist()

            batch = processor(images=[image, image], text=prompts, padding_side="left", return_tensors="pt")
            generated = model.generate(**batch, min_new_tokens=MAX_NEW_TOKENS, **greedy)
            results["batched"] = generated[:, batch["input_ids"].shape[1] :].tolist()
            results["decoded"] = processor.post_process_image_text_to_text(results["batched"])

            class Collect(BaseStreamer):
                def __init__(self):
                    self.chunks = []

                def put(self, value):
                    self.chunks.append(value.reshape(-1).tolist())

                def end(self):
                    pass

            streamer = Collect()
            model.generate(**single, min_new_tokens=MAX_NEW_TOKENS, streamer=streamer, **greedy)
            # The first chunk is the prompt; then one token per step.
            results["streamed"] = [token for chunk in streamer.chunks[1:] for token in chunk]

            # Without the cache every step recomputes the whole sequence: the same ids show the cache kept the history.
            generated = model.generate(**single, min_new_tokens=MAX_NEW_TOKENS, use_cache=False, **greedy)
            results["uncached"] = generated[0, single["input_ids"].shape[1] :].tolist()

            # Per-row stop: a token that the first row generates mid-answer (for the first time) and the second row
            # never does becomes the stop sequence; the first row must end there (then padding), the second run on.
            row, other = results["batched"]
            candidates = [
                token for index, token in enumerate(row[:-1]) if index > 0 and token not in other + row[:index]
            ]
            results["per_row_stop"] = None
            if candidates:
                saved_stops = model.config.stop_token_ids
                model.config.stop_token_ids = [[candidates[0]]]
                try:
                    stopped = model.generate(**batch, **greedy)[:, batch["input_ids"].shape[1] :].tolist()
                finally:
                    model.config.stop_token_ids = saved_stops
                results["per_row_stop"] = {
                    "stop_id": candidates[0],
                    "pad_token_id": model.generation_config.pad_token_id,
                    "ids": stopped,
                }

        report["stage"] = "train"
        model.train()
        training = processor(images=[image, image], text=prompts, suffix=[" A cat.###", " Two dogs.###"],
                             return_tensors="pt")
        output = model(**training)
        output.loss.backward()
        results["loss"] = output.loss.item()
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        results["trainable_get_grads"] = bool(trainable) and all(parameter.grad is not None for parameter in trainable)
        report["stage"] = "done"
    except BaseException as error:  # the report names every failure, whatever it is
        report["error"] = _error_line(error)
        report["traceback"] = traceback.format_exc()[-4000:]
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: remote_code_probe.py MODEL_FOLDER IMAGE_PATH", file=sys.stderr)
        return 2
    report = run_probe(*argv)
    print(json.dumps(report))
    return 0 if report["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
