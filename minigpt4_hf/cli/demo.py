#!/usr/bin/env python
"""
The MiniGPT-4 web demo (Gradio), as the original `demo.py`: upload an image, chat about it with streamed answers,
beam-search and temperature sliders, restart.

    pip install 'minigpt4-hf[demo]'
    minigpt4-demo --model PATH_OR_ID                       # http://127.0.0.1:7860
    minigpt4-demo --model PATH_OR_ID --host 0.0.0.0 --port 8080 --load-in-8bit
"""

import argparse
import os

from minigpt4_hf.cli.options import (
    CommandLineParser,
    UserError,
    add_generation_arguments,
    add_model_arguments,
    generation_kwargs_from_args,
    model_loading_kwargs,
    positive_int,
    run_main,
    seed_if_asked,
)
from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS, ORIGINAL_CONTEXT_BUDGET
from minigpt4_hf.inputs import check_model_path


PROG = "minigpt4-demo"


TITLE = "# MiniGPT-4\nUpload an image, press **Upload & Start Chat**, then ask about it."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to serve on; 0.0.0.0 = every interface (default: %(default)s).")
    parser.add_argument("--port", type=positive_int, default=7860, help="Port to serve on (default: %(default)s).")
    parser.add_argument("--share", action="store_true",
                        help="Also open a public gradio.live link, as the original did (default: off).")
    parser.add_argument(
        "--max-context-tokens", type=positive_int, default=ORIGINAL_CONTEXT_BUDGET,
        help="Token budget of prompt + answer; older turns are dropped beyond it (default: %(default)s, the "
        "original's).",
    )
    add_generation_arguments(parser, sample=True)
    return parser.parse_args(argv)


def build_demo(model, processor, generation_kwargs: dict | None = None, context_budget: int = ORIGINAL_CONTEXT_BUDGET):
    """The Gradio app around a loaded model: one `Conversation` per browser session (in `gr.State`)."""
    import gradio as gr

    from minigpt4_hf.inference import Conversation

    generation_kwargs = dict(CHAT_GENERATION_DEFAULTS if generation_kwargs is None else generation_kwargs)

    def upload_image(image, conversation):
        if image is None:
            return None, gr.update(interactive=True), gr.update(), conversation
        conversation = Conversation(model, processor, generation_kwargs, context_budget, notify=gr.Info)
        conversation.upload_image(image)
        return (
            gr.update(interactive=False),
            gr.update(value="Start Chatting", interactive=False),
            gr.update(interactive=True, placeholder="Type and press Enter"),
            conversation,
        )

    def ask(message, history, conversation):
        if conversation is None:
            return gr.update(value=message, placeholder="Upload an image first."), history, conversation
        if not message.strip():
            return gr.update(value="", placeholder="The question should not be empty!"), history, conversation
        if conversation.has_pending_question():
            gr.Info("Wait for the current answer before asking again.")
            return gr.update(value=message), history, conversation
        conversation.ask(message)
        return "", history + [{"role": "user", "content": message}], conversation

    def answer(history, conversation, num_beams, temperature):
        if conversation is None or not history or history[-1]["role"] != "user":
            yield history, conversation
            return
        overrides = {"num_beams": int(num_beams)}
        if generation_kwargs.get("do_sample", True):
            overrides["temperature"] = float(temperature)
        history = history + [{"role": "assistant", "content": ""}]
        streamed = ""
        try:
            for piece in conversation.stream_answer(**overrides):
                streamed += piece
                history[-1] = {"role": "assistant", "content": streamed}
                yield history, conversation
        except ValueError as error:  # the question alone does not fit the context
            history[-1] = {"role": "assistant", "content": f"(error: {error})"}
            yield history, conversation
            return
        history[-1] = {"role": "assistant", "content": conversation.messages[-1]["content"][0]["text"]}
        yield history, conversation

    def restart(conversation):
        if conversation is not None:
            conversation.reset()
        return (
            [],
            None,
            gr.update(value=None, interactive=True),
            gr.update(value="", interactive=False, placeholder="Upload an image first."),
            gr.update(value="Upload & Start Chat", interactive=True),
        )

    with gr.Blocks(title="MiniGPT-4") as demo:
        gr.Markdown(TITLE)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image")
                upload_button = gr.Button("Upload & Start Chat", variant="primary")
                restart_button = gr.Button("Restart")
                num_beams = gr.Slider(1, 10, value=generation_kwargs.get("num_beams", 1), step=1,
                                      label="Beam search numbers", interactive=True)
                temperature = gr.Slider(0.1, 2.0, value=generation_kwargs.get("temperature", 1.0), step=0.1,
                                        label="Temperature", interactive=True)
            with gr.Column(scale=2):
                conversation_state = gr.State(None)
                chatbot = gr.Chatbot(label="MiniGPT-4", elem_id="chatbot")
                question = gr.Textbox(label="User", placeholder="Upload an image first.", interactive=False,
                                      elem_id="question")

        upload_button.click(
            upload_image, [image, conversation_state], [image, upload_button, question, conversation_state]
        )
        question.submit(ask, [question, chatbot, conversation_state], [question, chatbot, conversation_state]).then(
            answer, [chatbot, conversation_state, num_beams, temperature], [chatbot, conversation_state]
        )
        restart_button.click(
            restart, [conversation_state], [chatbot, conversation_state, image, question, upload_button], queue=False
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("The demo needs gradio: pip install 'minigpt4-hf[demo]'.") from None
    from minigpt4_hf.inference import load_model_and_processor

    model, processor = load_model_and_processor(args.model, **model_loading_kwargs(args))
    seed_if_asked(args.seed)
    demo = build_demo(model, processor, generation_kwargs_from_args(args), args.max_context_tokens)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


def cli() -> None:
    """Console entry point `minigpt4-demo`."""
    run_main(main, PROG)


if __name__ == "__main__":
    cli()
