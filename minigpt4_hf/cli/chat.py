#!/usr/bin/env python
"""
Chat with MiniGPT-4 about an image in the terminal: the original demo without the browser.

    minigpt4-chat --model PATH_OR_ID --image photo.jpg                       # interactive, streamed
    minigpt4-chat --model PATH_OR_ID --image photo.jpg --prompt "What is it?"  # one answer on stdout
    minigpt4-chat --model MINIGPT_V2 --image photo.jpg --task refer --prompt "the red car"

Interactive mode reads questions from stdin, one a line (so it can be piped), and writes the answers to stdout as they
are generated, one a line; notices and prompts go to stderr. Commands: /image FILE, /task NAME, /reset, /quit.

MiniGPT-v2 answers that hold boxes (`{<x1><y1><x2><y2>}` on a 0-100 grid) are followed on stdout by one line per box,
`box: PHRASE (x1, y1, x2, y2) px`, in pixels of the image; box text that cannot be read is reported on stderr.
"""

import argparse
import sys

from minigpt4_hf.cli.options import CommandLineParser, UserError, add_inference_arguments, load_model_from_args
from minigpt4_hf.cli.options import add_task_argument, check_task_fits_model, console_entry_point, positive_int
from minigpt4_hf.generation import ORIGINAL_CONTEXT_BUDGET
from minigpt4_hf.inputs import check_image_file, check_model_path


PROG = "minigpt4-chat"


COMMANDS_HELP = (
    "Commands: /image FILE (start over with another image), /task NAME (MiniGPT-v2: ask with a task identifier, "
    "one of vqa, caption, grounding, refer, detection, identify; /task alone: none), /reset (start over, same image), "
    "/quit. "
    "Anything else is a question; Ctrl-C stops an answer."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    add_inference_arguments(parser, sample=True)
    parser.add_argument("--image", help="The image to talk about (default: none; interactive mode can load one with "
                        "/image FILE).")
    parser.add_argument(
        "--prompt", help="Answer this one question about --image, print the answer alone on stdout and exit "
        "(default: none: interactive).",
    )
    parser.add_argument(
        "--max-context-tokens", type=positive_int, default=ORIGINAL_CONTEXT_BUDGET,
        help="Token budget of prompt + answer; older turns are dropped beyond it (default: %(default)s, the "
        "original's).",
    )
    add_task_argument(parser)
    args = parser.parse_args(argv)
    if args.prompt is not None and args.image is None:
        parser.error("--prompt answers a question about an image: add --image FILE.")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty.")
    return args


def read_image(path: str):
    """The `--image` file, decoded (a file that is not an image is a `UserError`)."""
    from processing_minigpt4 import load_rgb_image

    try:
        return load_rgb_image(path)
    except ValueError as error:
        raise UserError(f"--image {path}: {error}") from None


def notice(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


def print_boxes(conversation) -> None:
    """MiniGPT-v2: the boxes of the last answer, one line each on stdout, in pixels of the conversation's image."""
    from minigpt4_hf.inference import answers_have_boxes, box_lines, grounded_boxes

    if not answers_have_boxes(conversation.model) or not conversation.images:
        return
    answer = conversation.messages[-1]["content"][0]["text"]
    objects, problems = grounded_boxes(conversation.processor, answer, conversation.images[-1].size)
    for line in box_lines(objects):
        print(line, flush=True)
    for problem in problems:
        notice(f"[boxes] {problem}")


def answer_once(conversation, image, question: str) -> int:
    """`--prompt` mode: the answer alone on stdout (then its boxes, for MiniGPT-v2)."""
    conversation.upload_image(image)
    try:
        conversation.ask(question)
        answer = conversation.answer()
    except ValueError as error:
        raise UserError(str(error)) from None
    print(answer, flush=True)
    print_boxes(conversation)
    return 0


def stream_to_stdout(conversation) -> None:
    """Prints one answer as it is generated; Ctrl-C stops it (the partial answer stays in the history)."""
    stream = conversation.stream_answer()
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        notice(" [stopped]", end="")
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()


def run_command(conversation, line: str) -> bool:
    """Carries out one `/command`; returns False for /quit."""
    command, _, argument = line.partition(" ")
    argument = argument.strip().strip("'\"")
    if command in ("/quit", "/exit", "/q"):
        return False
    if command == "/reset":
        conversation.reset(keep_images=True)
        notice("Conversation restarted." + (" Same image; ask a question." if conversation.images else ""))
    elif command == "/image":
        if not argument:
            notice("Usage: /image FILE")
            return True
        try:
            conversation.new_image(argument)
        except ValueError as error:
            notice(f"error: {error} (the conversation goes on as before)")
            return True
        notice(f"New image {argument}: conversation restarted. Ask a question.")
    elif command == "/task":
        from minigpt4_hf.inference import answers_have_boxes
        from processing_minigpt4 import TASK_IDENTIFIERS

        if argument and argument.strip("[]") not in TASK_IDENTIFIERS:
            notice(f"Unknown task {argument}; choose one of {', '.join(TASK_IDENTIFIERS)} (or /task alone for none).")
        elif argument and not answers_have_boxes(conversation.model):
            notice("Task identifiers are MiniGPT-v2 prompts; this model is another variant.")
        else:
            conversation.task = argument.strip("[]") or None
            notice(f"Questions now start with [{conversation.task}]." if conversation.task else "No task identifier.")
    elif command == "/help":
        notice(COMMANDS_HELP)
    else:
        notice(f"Unknown command {command}. {COMMANDS_HELP}")
    return True


def chat_interactively(conversation, image, lines) -> int:
    """The chat loop over `lines` (stdin): questions are answered, `/commands` carried out, EOF or /quit ends it."""
    interactive = hasattr(lines, "isatty") and lines.isatty()
    notice(COMMANDS_HELP)
    if image is not None:
        conversation.upload_image(image)
        notice("Image loaded. Ask a question.")
    else:
        notice("No image yet: load one with /image FILE.")
    while True:
        if interactive:
            notice("You: ", end="")
        try:
            line = lines.readline()
        except KeyboardInterrupt:
            notice("")
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not run_command(conversation, line):
                break
            continue
        if not conversation.images:
            notice("No image yet: load one with /image FILE first.")
            continue
        conversation.ask(line)
        if interactive:
            notice("MiniGPT-4: ", end="")
        try:
            stream_to_stdout(conversation)
        except ValueError as error:  # the question cannot fit the context even alone
            notice(f"error: {error}")
            continue
        print_boxes(conversation)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)
    check_task_fits_model(args)
    if args.image is not None:
        check_image_file(args.image)
    image = read_image(args.image) if args.image is not None else None  # fail fast, before loading the model

    from minigpt4_hf.inference import Conversation

    model, processor, generate_kwargs = load_model_from_args(args)
    conversation = Conversation(model, processor, generate_kwargs, args.max_context_tokens)
    conversation.task = args.task
    if args.prompt is not None:
        return answer_once(conversation, image, args.prompt)
    return chat_interactively(conversation, image, sys.stdin)


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
