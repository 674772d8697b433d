#!/usr/bin/env python
"""
The MiniGPT-4 web demo (Gradio), as the original `demo.py`: upload an image, chat about it with streamed answers,
beam-search and temperature sliders, restart. For a MiniGPT-v2 model, as the original `demo_v2.py`: task shortcuts
([grounding], [refer], ...) and the boxes of each answer drawn on the image.

    pip install '.[demo]'                                  # in the checkout: gradio
    minigpt4-demo --model PATH_OR_ID                       # http://127.0.0.1:7860
    minigpt4-demo --model PATH_OR_ID --host 0.0.0.0 --port 8080 --max-queue-size 32

Every browser session has its own conversation. One answer is generated at a time; the others wait in Gradio's queue
(each sees its place in it), and beyond --max-queue-size waiting requests a new one is told the demo is busy.
See docs/demo.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import TYPE_CHECKING

from minigpt4_hf.cli.options import CommandLineParser, UserError, add_inference_arguments, check_extra_installed
from minigpt4_hf.cli.options import console_entry_point, load_model_from_args, positive_int
from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS, ORIGINAL_CONTEXT_BUDGET
from minigpt4_hf.inputs import check_model_path


PROG = "minigpt4-demo"

if TYPE_CHECKING:
    from minigpt4_hf.inference import Conversation


logger = logging.getLogger(__name__)

TITLE = "# MiniGPT-4\nUpload an image, press **Upload & Start Chat**, then ask about it."
TITLE_V2 = "# MiniGPT-v2\nUpload an image, press **Upload & Start Chat**, pick a task (or none), then ask."
DEFAULT_MAX_QUEUE_SIZE = 16
# Every event that runs the model shares this Gradio concurrency group: one generation at a time per model.
MODEL_CONCURRENCY_ID = "model"

# MiniGPT-v2's task shortcuts, `demo_v2.py@d94738a` (`gradio_taskselect`): what each puts in the question box, and its
# hint. The original's [identify] took a box drawn on the image; here it is typed on the 0-100 grid.
TASK_SHORTCUTS = {
    "No tag": ("", "Type in whatever you want."),
    "Grounding": ("[grounding] describe this image in detail",
                  "Send the command to generate a grounded image description."),
    "Refer": ("[refer] ", "Type in a phrase about an object in the image and send the command."),
    "Detection": ("[detection] ", "Type in a caption or phrase, and see object locations in the image."),
    "Identify": ("[identify] what is this ",
                 "Add a box as {<x1><y1><x2><y2>} on a 0-100 grid (e.g. {<4><50><30><65>}) and send the command."),
    "VQA": ("[vqa] ", "Send a question to get a short answer."),
}
# Box colours of `demo_v2.py@d94738a` (`colors`), one per phrase in turn.
BOX_COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (210, 210, 0), (255, 0, 255), (0, 255, 255), (114, 128, 250),
    (0, 165, 255), (0, 128, 0), (144, 238, 144), (238, 238, 175), (255, 191, 0), (0, 128, 0), (226, 43, 138),
    (255, 0, 255), (0, 215, 255),
]
# The original showed the boxes on the image resized to 500 px wide.
BOXES_IMAGE_WIDTH = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    add_inference_arguments(parser, sample=True)
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default="127.0.0.1", help="Address to serve on (default 127.0.0.1; 0.0.0.0: every interface)."
    )
    server.add_argument("--port", type=int, default=7860, help="Port to serve on (default: %(default)s).")
    server.add_argument(
        "--max-queue-size",
        type=positive_int,
        default=DEFAULT_MAX_QUEUE_SIZE,
        help="Most requests that may wait in the queue at once (answers wait there for the model); beyond it a new "
        "one is told the demo is busy (default: %(default)s).",
    )
    server.add_argument("--share", action="store_true", help="Also open a public gradio.live link, as the original did (default: off).")
    parser.add_argument(
        "--max-context-tokens",
        type=positive_int,
        default=ORIGINAL_CONTEXT_BUDGET,
        help="Token budget of prompt + answer; older turns are dropped beyond it (default: %(default)s, the "
        "original's).",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    return args


def check_port_free(host: str, port: int) -> None:
    """Raises `UserError` naming `--port` (or `--host`) when the server could not listen there."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: not an address of this machine ({error.strerror}).") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise UserError(
                f"--port {port}: cannot listen on {host}:{port} ({error.strerror}); another program (or demo) uses "
                "it. Pick another --port, or stop that program."
            ) from None


def display_text(text: str) -> str:
    """A turn's text as the chat shows it: `<` and `>` escaped for Markdown, as the original `demo_v2.py` did."""
    return text.replace("<", "\\<").replace(">", "\\>")


def chat_history(conversation: Conversation | None, partial_answer: str | None = None) -> list[dict]:
    """
    What the chat window shows: the text turns of `conversation` (the image is in the image box), plus the answer
    being streamed. The screen is always drawn from the model-side conversation, so the two cannot disagree.
    """
    history = []
    for message in conversation.messages if conversation is not None else []:
        text = "".join(part["text"] for part in message["content"] if part["type"] == "text")
        if text:
            history.append({"role": message["role"], "content": display_text(text)})
    if partial_answer is not None:
        history.append({"role": "assistant", "content": display_text(partial_answer)})
    return history


def draw_boxes(image, boxes: list[dict], width: int = BOXES_IMAGE_WIDTH):
    """
    `image` resized to `width` pixels wide with each box of `boxes` (`{"phrase", "box": (x1, y1, x2, y2)}` in pixels
    of `image`, as `processor.post_process_grounding` returns them) outlined, in one colour per phrase, and labelled
    with its phrase in black on a light tint of that colour (as the original). Returns a new RGB image.
    """
    from PIL import ImageDraw

    scale = width / image.width
    canvas = image.convert("RGB").resize((width, max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(canvas)
    colour_of: dict = {}
    for entry in boxes:
        colour = BOX_COLOURS[colour_of.setdefault(entry["phrase"], len(colour_of)) % len(BOX_COLOURS)]
        x1, y1, x2, y2 = (round(value * scale) for value in entry["box"])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        if entry["phrase"]:
            left, top, right, bottom = draw.textbbox((x1 + 4, y1 + 4), entry["phrase"])
            draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=tuple((c + 255) // 2 for c in colour))
            draw.text((x1 + 4, y1 + 4), entry["phrase"], fill=(0, 0, 0))
    return canvas


def build_demo(model, processor, generation_kwargs: dict | None = None, context_budget: int = ORIGINAL_CONTEXT_BUDGET):
    """
    The Gradio app around a loaded model. Each browser session keeps its own `Conversation` in a `gr.State`; the
    chat on screen is redrawn from it after every step. Serve it with `launch`, which sets up the queue.
    """
    import gradio as gr

    from minigpt4_hf.inference import Conversation
    from processing_minigpt4 import load_rgb_image

    generation_kwargs = dict(CHAT_GENERATION_DEFAULTS if generation_kwargs is None else generation_kwargs)
    grounding = model.config.variant == "v2"  # MiniGPT-v2: task shortcuts and boxes

    def boxes_of_answer(conversation: Conversation):
        """The boxes image update after an answer (MiniGPT-v2): shown when the answer holds readable boxes."""
        image, answer_text = conversation.images[0], conversation.messages[-1]["content"][0]["text"]
        (grounded,) = processor.post_process_grounding([answer_text], [image.size])
        if grounded.problems:
            gr.Warning("Box text that cannot be drawn: " + "; ".join(grounded.problems))
        if not grounded:
            return no_boxes()
        return gr.update(value=draw_boxes(image, list(grounded)), visible=True)

    def with_boxes(*outputs, boxes=None):
        """The event's outputs, plus the boxes image for a MiniGPT-v2 model (unchanged unless `boxes`)."""
        if grounding:
            return (*outputs, gr.update() if boxes is None else boxes)
        return outputs[0] if len(outputs) == 1 else outputs

    def no_boxes():
        return gr.update(value=None, visible=False)

    def new_conversation(image) -> Conversation:
        conversation = Conversation(model, processor, generation_kwargs, context_budget, notify=gr.Warning)
        conversation.upload_image(image)
        return conversation

    def upload_image(upload: dict | None, conversation):
        unchanged = (gr.update(), gr.update(), gr.update(), conversation, gr.update())
        if upload is None:
            gr.Warning("No image yet: drop one in the image box (or click it to pick a file), then press "
                       "Upload & Start Chat.")
            return with_boxes(*unchanged)
        try:  # Gradio hands over the uploaded file untouched (preprocess=False): the one image opener reads it
            image = load_rgb_image(upload["path"])
        except ValueError as error:
            gr.Warning(str(error).replace(upload["path"], upload.get("orig_name") or "the upload"))
            return with_boxes(gr.update(value=None), *unchanged[1:])
        return with_boxes(
            gr.update(interactive=False),
            gr.update(value="Start Chatting", interactive=False),
            gr.update(interactive=True, placeholder="Type and press Enter"),
            new_conversation(image),
            [],
            boxes=no_boxes(),
        )

    def ask(message: str, conversation):
        if conversation is None:
            gr.Warning("Upload an image and press Upload & Start Chat first.")
            return gr.update(value=message), chat_history(conversation)
        if not message.strip():
            gr.Warning("The question is empty: type one, then press Enter.")
            return gr.update(value=""), chat_history(conversation)
        if conversation.has_pending_question():
            gr.Warning("Wait for the current answer before asking again.")
            return gr.update(value=message), chat_history(conversation)
        conversation.ask(message)
        return "", chat_history(conversation)

    def answer(conversation, num_beams, temperature):
        if conversation is None or not conversation.has_pending_question():
            yield with_boxes(chat_history(conversation), gr.update())
            return
        question = conversation.messages[-1]["content"][-1]["text"]
        overrides = {"num_beams": int(num_beams)}
        if generation_kwargs.get("do_sample", True):
            overrides["temperature"] = float(temperature)
        streamed = ""
        try:
            for piece in conversation.stream_answer(**overrides):
                streamed += piece
                yield with_boxes(chat_history(conversation, partial_answer=streamed), gr.update())
        except Exception as error:  # the question alone does not fit, or generating failed (e.g. out of memory)
            conversation.withdraw_question()  # the session goes on as before the question, which is given back
            if isinstance(error, ValueError):
                gr.Warning(str(error))
            else:
                logger.exception("An answer failed")
                gr.Warning(f"The answer failed ({type(error).__name__}: {error}); ask again.")
            yield with_boxes(chat_history(conversation), gr.update(value=question))
            return
        yield with_boxes(chat_history(conversation), gr.update(),
                         boxes=boxes_of_answer(conversation) if grounding else None)

    def clear_chat(conversation):
        """The chat's own Clear button: same image, no turns (a fresh conversation, so a cancelled answer that
        finishes late lands in the old one)."""
        fresh = None if conversation is None or not conversation.images else new_conversation(conversation.images[0])
        return with_boxes(fresh, boxes=no_boxes())

    def restart():
        return with_boxes(
            [],
            None,
            gr.update(value=None, interactive=True),
            gr.update(value="", interactive=False, placeholder="Upload an image first."),
            gr.update(value="Upload & Start Chat", interactive=True),
            boxes=no_boxes(),
        )

    def pick_task(task: str | None):
        prefix, hint = TASK_SHORTCUTS[task or "No tag"]
        return gr.update(value=prefix), f"**Hint:** {hint}"

    with gr.Blocks(title="MiniGPT-v2" if grounding else "MiniGPT-4") as demo:
        gr.Markdown(TITLE_V2 if grounding else TITLE)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="image")
                upload_button = gr.Button("Upload & Start Chat", variant="primary")
                restart_button = gr.Button("Restart")
                num_beams = gr.Slider(1, 10, value=generation_kwargs.get("num_beams", 1), step=1,
                                      label="Beam search numbers", interactive=True)
                temperature = gr.Slider(0.1, 2.0, value=generation_kwargs.get("temperature", 1.0), step=0.1,
                                        label="Temperature", interactive=True)
            with gr.Column(scale=2):
                conversation_state = gr.State(None)
                chatbot = gr.Chatbot(label="MiniGPT-v2" if grounding else "MiniGPT-4", elem_id="chatbot")
                if grounding:
                    task = gr.Radio(list(TASK_SHORTCUTS), value=None, label="Task shortcuts", elem_id="task")
                    task_hint = gr.Markdown("**Hint:** Upload your image and chat.", elem_id="task-hint")
                question = gr.Textbox(label="User", placeholder="Upload an image first.", interactive=False,
                                      elem_id="question")
                if grounding:
                    boxes = gr.Image(label="Boxes in the last answer", type="pil", format="png", interactive=False,
                                     visible=False, elem_id="boxes")
        boxes_output = [boxes] if grounding else []

        # Every step goes through Gradio's queue (that is what shows its messages); the light ones never wait
        # (no concurrency limit), an upload decodes one image at a time, and answers take turns on the model.
        upload_button.click(
            upload_image, [image, conversation_state],
            [image, upload_button, question, conversation_state, chatbot, *boxes_output],
            preprocess=False, api_name="upload_image",
        )
        answer_event = question.submit(
            ask, [question, conversation_state], [question, chatbot], concurrency_limit=None, api_name="ask"
        ).then(
            answer, [conversation_state, num_beams, temperature], [chatbot, question, *boxes_output],
            api_name="answer", concurrency_limit=1, concurrency_id=MODEL_CONCURRENCY_ID, show_progress_on=[chatbot],
        )
        chatbot.clear(clear_chat, [conversation_state], [conversation_state, *boxes_output], cancels=[answer_event],
                      concurrency_limit=None, api_name="clear")
        restart_button.click(
            restart, None, [chatbot, conversation_state, image, question, upload_button, *boxes_output],
            cancels=[answer_event], concurrency_limit=None, api_name="restart",
        )
        if grounding:
            task.change(pick_task, [task], [question, task_hint], concurrency_limit=None, api_name="pick_task")
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
           share: bool = False, block: bool = True):
    """Serves `demo` with Gradio's queue: at most `max_queue_size` answers wait, one runs at a time per model."""
    demo.queue(max_size=max_queue_size, default_concurrency_limit=1)
    try:
        return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                           show_error=True)
    except OSError as error:  # the port was taken between the check and the launch
        if "port" not in str(error):
            raise
        raise UserError(f"--port {port}: cannot listen on {host}:{port}; pick another --port.") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_port_free(args.host, args.port)  # before gradio and the model load
    check_model_path(args.model)
    check_extra_installed("demo", "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    model, processor, generate_kwargs = load_model_from_args(args)
    demo = build_demo(model, processor, generate_kwargs, args.max_context_tokens)
    launch(demo, args.host, args.port, args.max_queue_size, share=args.share)
    return 0


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
