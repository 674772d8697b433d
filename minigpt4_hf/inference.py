"""
Inference: the one model loader (device, dtype and quantization policy), batched answers, and `Conversation`, the
original `Chat` on top of `generate()` and the chat template. The command-line tools (minigpt4-chat, -caption, -demo,
-train, -build-stage2-data) load models through `load_model_and_processor`.
"""

import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS, ORIGINAL_CONTEXT_BUDGET, generation_kwargs
from minigpt4_hf.inputs import InputError, check_model_path, model_not_loadable_message
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration
from processing_minigpt4 import TURN_SEPARATOR, MiniGPT4Processor, load_rgb_image


# Parts kept out of 8-/4-bit quantisation: everything but the language model's linear layers (its output layer too,
# as bitsandbytes does by default for causal LMs).
QUANTIZATION_SKIP_MODULES = ["vision_model", "qformer", "query_tokens", "language_projection", "lm_head"]


# --------------------------------------------------------------------------------------------------------------------
# Loading.


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name other than "auto" (float32, bfloat16, float16)."""
    return getattr(torch, name)


def resolve_device(name: str | None) -> torch.device:
    """The device to run on: `name`, or CUDA when present, else the CPU. Unavailable devices are an `InputError`."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device {name!r}; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} asks for a CUDA GPU, but this machine has none; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: Apple MPS is not available here; use --device cpu.")
    return device


def resolve_dtype(name: str, device: torch.device, quantized: bool = False,
                  device_map: str | dict | None = None) -> torch.dtype | str:
    """
    The one dtype policy of loading: a named dtype as given; "auto" = float16 with 8-/4-bit quantisation (as the
    original's 8-bit `low_resource` mode), float32 on the CPU (half precision is slow or missing there), otherwise
    the checkpoint's own dtype (`"auto"` for `from_pretrained`).
    """
    if name != "auto":
        return torch_dtype(name)
    if quantized:
        return torch.float16
    if device.type == "cpu" and device_map is None:
        return torch.float32
    return "auto"


def quantization_config_for(load_in_8bit: bool, load_in_4bit: bool, dtype: str = "auto") -> BitsAndBytesConfig | None:
    """
    The `BitsAndBytesConfig` for 8- or 4-bit loading (None for neither): only the language model's linear layers are
    quantised; the ViT, Q-Former, query tokens, projection and LM head keep their dtype.
    """
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES))
    if not load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16 if dtype == "auto" else torch_dtype(dtype),
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


def check_quantization_possible(flag: str, device: torch.device) -> None:
    """Refuses 8-/4-bit loading where bitsandbytes cannot run it, saying why and what to do instead."""
    if not torch.cuda.is_available():
        raise InputError(
            f"{flag} needs an NVIDIA GPU with CUDA (bitsandbytes), and this machine has none. Drop {flag} to run "
            "unquantised on the CPU (float32 by default, or --dtype bfloat16 to halve the memory)."
        )
    if device.type != "cuda":
        raise InputError(f"{flag} runs on a CUDA GPU; drop --device {device} or pick a cuda device.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            f"{flag} needs the bitsandbytes package: install the quantization extra (pip install '.[quantization]' in "
            "the checkout, or pip install bitsandbytes)."
        )


def check_accelerate_installed(flag: str) -> None:
    if importlib.util.find_spec("accelerate") is None:
        raise InputError(f"{flag} needs the accelerate package: pip install accelerate (or the quantization extra).")


def load_model_and_processor(
    model_path: str,
    *,
    device: str | None = None,
    dtype: str = "auto",
    device_map: str | dict | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> tuple[MiniGPT4ForConditionalGeneration, MiniGPT4Processor]:
    """
    Loads a saved MiniGPT-4 (a `save_pretrained` folder or a Hub id) and its processor with this checkout's classes
    (the code copied into the folder is neither run nor asked about).

    Args:
        model_path: the folder or Hub id (`--model`).
        device: where the model goes (`resolve_device`; default: CUDA when present, else the CPU).
        dtype: "auto" or a dtype name (`resolve_dtype` gives the policy).
        device_map: spread the model over devices with accelerate instead (e.g. "auto").
        load_in_8bit, load_in_4bit: bitsandbytes quantisation of the language model's linear layers (CUDA only).

    Returns:
        `(model, processor)`, the model in eval mode on its device(s).

    Raises:
        InputError: the path, device or quantisation cannot be used (the message says what to do instead).
    """
    model_path = str(model_path)
    check_model_path(model_path)
    resolved_device = resolve_device(device)
    quantization_config = quantization_config_for(load_in_8bit, load_in_4bit, dtype)
    if quantization_config is not None:
        check_quantization_possible("--load-in-8bit" if load_in_8bit else "--load-in-4bit", resolved_device)
        check_accelerate_installed("--load-in-8bit" if load_in_8bit else "--load-in-4bit")
    if device_map is not None:
        check_accelerate_installed("--device-map")

    load_kwargs = {"dtype": resolve_dtype(dtype, resolved_device, quantization_config is not None, device_map)}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    elif quantization_config is not None:
        # One pinned device, as the original loaded its 8-bit model (`device_map={'': device_8bit}`,
        # minigpt4/models/mini_gpt4.py@22d8888); "auto" spread it over GPUs and failed there.
        index = resolved_device.index if resolved_device.index is not None else torch.cuda.current_device()
        load_kwargs["device_map"] = {"": index}
    if quantization_config is not None:
        load_kwargs["quantization_config"] = quantization_config

    try:
        processor = MiniGPT4Processor.from_pretrained(model_path)
        model = MiniGPT4ForConditionalGeneration.from_pretrained(model_path, **load_kwargs)
    except (OSError, ValueError) as error:
        if not Path(model_path).exists():
            raise InputError(model_not_loadable_message(model_path)) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"--model {model_path}: cannot load a MiniGPT-4 model and processor from it ({reason})."
        ) from None
    if "device_map" not in load_kwargs:
        model.to(resolved_device)
    return model.eval(), processor


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the language model's embeddings (the first stop of `input_ids`)."""
    return model.get_input_embeddings().weight.device


# --------------------------------------------------------------------------------------------------------------------
# Batched answers (minigpt4-caption, the stage-2 builder) and the chat (minigpt4-chat, minigpt4-demo).


@torch.inference_mode()
def generate_answers(model, processor, images: list, prompts: list[str], **generate_kwargs) -> list[str]:
    """
    One left-padded batched `generate` call, one image per prompt; returns each row's answer as the original chat
    post-processed it (new tokens only, cut at `###`).
    """
    inputs = processor(images=list(images), text=list(prompts), padding_side="left", return_tensors="pt")
    inputs = inputs.to(input_device(model))
    generated = model.generate(**inputs, **generate_kwargs)
    return processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])


def user_message(text: str | None = None, with_image: bool = True, task: str | None = None) -> dict:
    """
    A chat-template user message: an image part and/or a text part, and the MiniGPT-v2 task identifier the chat
    template writes before the text (`"refer"` -> `[refer] ...`).
    """
    content = [{"type": "image"}] if with_image else []
    if text is not None:
        content.append({"type": "text", "text": text})
    message = {"role": "user", "content": content}
    if task is not None:
        message["task"] = task
    return message


def answer_batch(model, processor, images: list, question: str, generate_kwargs: dict,
                 task: str | None = None) -> list[str]:
    """
    Answers one question about each image, in one left-padded batch. Images are PIL images (or anything
    `load_rgb_image` takes). Returns one answer per image, post-processed as the original chat did.
    """
    prompt = processor.apply_chat_template([user_message(question, task=task)], add_generation_prompt=True)
    return generate_answers(model, processor, images, [prompt] * len(images), **generate_kwargs)


def answers_have_boxes(model) -> bool:
    """Whether the model writes boxes into its answers (MiniGPT-v2)."""
    return getattr(model.config, "variant", "vicuna0") == "v2"


def grounded_boxes(processor, answer: str, image_size: tuple[int, int]) -> tuple[list[dict], list[str]]:
    """
    `(objects, problems)` of one MiniGPT-v2 answer: `{"phrase": str | None, "box": [x1, y1, x2, y2]}` in pixels of
    an image of `image_size` (width, height), and what could not be read (`post_process_grounding`).
    """
    found = processor.post_process_grounding([answer], [image_size])[0]
    objects = [{"phrase": item["phrase"], "box": [round(value, 2) for value in item["box"]]} for item in found]
    return objects, list(found.problems)


def box_lines(objects: list[dict]) -> list[str]:
    """One line per box, as the chat prints them: `box: PHRASE (x1, y1, x2, y2) px`."""
    return [
        f"box: {item['phrase'] or '(no phrase)'} ({', '.join(f'{value:g}' for value in item['box'])}) px"
        for item in objects
    ]


def check_question_fits(model, processor, question: str, max_new_tokens: int, task: str | None = None) -> None:
    """
    Raises ValueError when one image plus `question` (in the chat template, with its MiniGPT-v2 `task`) plus
    `max_new_tokens` new tokens exceed the language model's context, saying by how much: checked once, before a batch
    run starts.
    """
    from PIL import Image

    prompt = processor.apply_chat_template([user_message(question, task=task)], add_generation_prompt=True)
    length = len(processor(images=[Image.new("RGB", (1, 1))], text=prompt)["input_ids"][0])
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    if context is not None and length + max_new_tokens > context:
        raise ValueError(
            f"The prompt takes {length} tokens with its image; with {max_new_tokens} new tokens that is more than "
            f"the model's {context}-token context. Shorten the prompt (or lower --max-new-tokens)."
        )


class _StopWhenCancelled(StoppingCriteria):
    """Ends generation for every row once `event` is set (a reader stopped listening to a streamed answer)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextBeforeSeparator:
    """
    Passes streamed text through up to the turn separator `###`, as the stored answer will read: a tail that might
    start the separator is held back (a reader never sees a `#` that turns out to end the turn), and so is trailing
    whitespace, and leading whitespace is dropped (the stored answer is stripped).
    """

    def __init__(self, separator: str = TURN_SEPARATOR):
        self.separator = separator
        self.pending = ""
        self.started = False
        self.finished = False

    def feed(self, piece: str) -> str:
        """Returns the part of `piece` (plus what was held back) that surely belongs to the answer."""
        if self.finished:
            return ""
        text = self.pending + piece
        cut = text.find(self.separator)
        if cut >= 0:
            self.finished, self.pending = True, ""
            return self._emit(text[:cut].rstrip())
        held = next(
            (size for size in range(min(len(self.separator) - 1, len(text)), 0, -1)
             if text.endswith(self.separator[:size])),
            0,
        )
        safe, held_text = text[: len(text) - held], text[len(text) - held :]
        stripped = safe.rstrip()
        self.pending = safe[len(stripped) :] + held_text
        return self._emit(stripped)

    def flush(self) -> str:
        """What was held back, once the stream has ended without a separator."""
        text, self.pending = ("" if self.finished else self.pending.rstrip()), ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


def _stderr_notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Conversation:
    """
    A chat about images, as the original `Chat` + `CONV_VISION_Vicuna0`: upload an image, ask, answer, ask again.

    The history is a list of chat-template messages (`messages`) plus the images in placeholder order (`images`).
    Each answer renders the whole history with `processor.apply_chat_template`, so the second question's prompt holds
    the first answer. When prompt + `max_new_tokens` would not fit in `context_budget` tokens (the original's 2,000,
    capped at the LM's context), the oldest exchanges are dropped (their images stay) and `notify` is told.

    Args:
        model, processor: a loaded MiniGPT-4 and its processor.
        generation_kwargs: `generate()` defaults for every answer (see `CHAT_GENERATION_DEFAULTS`).
        context_budget: most tokens (image tokens included) that prompt + answer may take.
        notify: called with a one-line notice when turns are dropped (default: print to stderr).
    """

    def __init__(
        self,
        model,
        processor,
        generation_kwargs: dict | None = None,
        context_budget: int = ORIGINAL_CONTEXT_BUDGET,
        notify: Callable[[str], None] = _stderr_notice,
    ):
        self.model = model
        self.processor = processor
        self.generation_kwargs = dict(CHAT_GENERATION_DEFAULTS if generation_kwargs is None else generation_kwargs)
        max_positions = getattr(model.config.text_config, "max_position_embeddings", None) or context_budget
        self.context_budget = min(context_budget, max_positions)
        self.notify = notify
        self.messages: list[dict] = []
        self.images: list = []
        self.last_prompt: str | None = None
        self.task: str | None = None  # MiniGPT-v2: the task identifier of the questions asked from now on

    # -- the original Chat's steps -----------------------------------------------------------------------------------

    def upload_image(self, image) -> str:
        """Adds an image (path, PIL image or array) as a user turn, as `Chat.upload_img`. Bad files raise ValueError."""
        self.images.append(load_rgb_image(image))
        self.messages.append(user_message())
        return "Received."

    def ask(self, text: str) -> None:
        """
        Adds a question; right after an image upload it joins the image's turn, as `Chat.ask` did. With `task` set
        (MiniGPT-v2), the question is asked with that task identifier.
        """
        text = text.strip()
        if not text:
            raise ValueError("The question is empty.")
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "user" and all(part["type"] == "image" for part in last["content"]):
            last["content"].append({"type": "text", "text": text})
            if self.task is not None:
                last["task"] = self.task
        else:
            self.messages.append(user_message(text, with_image=False, task=self.task))

    def answer(self, **generation_overrides) -> str:
        """Generates the answer to the pending question, stores it in the history and returns it."""
        inputs, kwargs = self._prepare(generation_overrides)
        with torch.inference_mode():
            generated = self.model.generate(**inputs, **kwargs)
        return self._store_answer(generated, inputs)

    def stream_answer(self, **generation_overrides) -> Iterator[str]:
        """
        Like `answer`, but yields the answer's text as it is generated (`TextIteratorStreamer`); the turn separator
        is not shown. The stored answer is the post-processed one (`messages[-1]`). Beam search cannot stream: it
        yields the whole answer at once. Closing the iterator early stops generation and keeps the partial answer.
        """
        inputs, kwargs = self._prepare(generation_overrides)
        if kwargs.get("num_beams", 1) > 1:
            with torch.inference_mode():
                generated = self.model.generate(**inputs, **kwargs)
            yield self._store_answer(generated, inputs)
            return
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        stopping = StoppingCriteriaList([_StopWhenCancelled(cancelled), *kwargs.pop("stopping_criteria", [])])
        result: dict = {}

        def generate() -> None:
            try:
                with torch.inference_mode():
                    result["ids"] = self.model.generate(
                        **inputs, **kwargs, streamer=streamer, stopping_criteria=stopping
                    )
            except BaseException as error:  # handed to the reading thread below
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=generate, name="minigpt4-generate", daemon=True)
        worker.start()
        visible = TextBeforeSeparator()
        try:
            for piece in streamer:
                text = visible.feed(piece)
                if text:
                    yield text
            tail = visible.flush()
            if tail:
                yield tail
        finally:
            cancelled.set()
            worker.join()
            if "error" in result:
                raise result["error"]
            self._store_answer(result["ids"], inputs)

    def reset(self, keep_images: bool = False) -> None:
        """Forgets the history (the demo's Restart), and the images too unless `keep_images` (the chat's `/reset`)."""
        images = list(self.images) if keep_images else []
        self.messages.clear()
        self.images.clear()
        self.last_prompt = None
        for image in images:
            self.upload_image(image)

    def new_image(self, image) -> str:
        """Starts over with another image (`/image FILE`). A bad image raises ValueError and changes nothing."""
        loaded = load_rgb_image(image)
        self.reset()
        return self.upload_image(loaded)

    # -- helpers ----------------------------------------------------------------------------------------------------

    def withdraw_question(self) -> str | None:
        """
        Takes the pending question back out of the history (its image stays), e.g. when it cannot fit or its answer
        failed; returns its text (None when no question is pending).
        """
        if not self.has_pending_question():
            return None
        last = self.messages[-1]
        question = next(part["text"] for part in reversed(last["content"]) if part["type"] == "text")
        remaining = [part for part in last["content"] if part["type"] != "text"]
        if remaining:
            self.messages[-1] = {"role": last["role"], "content": remaining}  # the question's task goes with it
        else:
            self.messages.pop()
        return question

    def has_pending_question(self) -> bool:
        """Whether the last turn is a question still waiting for its answer."""
        return bool(self.messages) and self.messages[-1]["role"] == "user" and any(
            part["type"] == "text" for part in self.messages[-1]["content"]
        )

    def _prepare(self, generation_overrides: dict):
        if not self.has_pending_question():
            raise ValueError("There is no question to answer: ask a question first.")
        kwargs = generation_kwargs({**self.generation_kwargs, **generation_overrides})
        inputs = self._fit_context(kwargs.get("max_new_tokens", CHAT_GENERATION_DEFAULTS["max_new_tokens"]))
        return inputs.to(input_device(self.model)), kwargs

    def _render(self):
        prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True)
        inputs = self.processor(images=self.images or None, text=prompt, return_tensors="pt")
        return prompt, inputs

    def _fit_context(self, max_new_tokens: int):
        """Drops the oldest exchanges until prompt + `max_new_tokens` fit the budget; returns the model inputs."""
        dropped = 0
        prompt, inputs = self._render()
        while inputs["input_ids"].shape[1] + max_new_tokens > self.context_budget:
            user_turns = [index for index, message in enumerate(self.messages) if message["role"] == "user"]
            if len(user_turns) < 2:
                self.withdraw_question()
                raise ValueError(
                    f"The image(s) and the question take {inputs['input_ids'].shape[1]} tokens; with "
                    f"{max_new_tokens} new tokens that is more than the {self.context_budget}-token context. "
                    "Shorten the question or lower --max-new-tokens."
                )
            self._drop_oldest_exchange(user_turns[1])
            dropped += 1
            prompt, inputs = self._render()
        if dropped:
            self.notify(
                f"[notice] The conversation no longer fits the {self.context_budget}-token context with "
                f"{max_new_tokens} new tokens: dropped the oldest {dropped} turn(s)."
            )
        self.last_prompt = prompt
        return inputs

    def _drop_oldest_exchange(self, next_user_index: int) -> None:
        """Removes the messages before `next_user_index`, moving their image parts into that next user message."""
        removed, self.messages = self.messages[:next_user_index], self.messages[next_user_index:]
        kept_images = [part for message in removed for part in message["content"]
                       if isinstance(part, dict) and part.get("type") == "image"]
        if kept_images:
            self.messages[0] = {**self.messages[0], "content": kept_images + list(self.messages[0]["content"])}


    def _store_answer(self, generated: torch.LongTensor, inputs) -> str:
        answer = self.processor.decode_answers(generated, prompt_length=inputs["input_ids"].shape[1])[0]
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer
