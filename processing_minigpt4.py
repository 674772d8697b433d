"""MiniGPT-4 processor: images as the original eval transform, prompts tokenized exactly as the original did.

The original (`Chat.get_context_emb` in `minigpt4/conversation/conversation.py@22d8888`, `prompt_wrap` in
`minigpt4/models/mini_gpt4.py@22d8888`) split a prompt at each `<ImageHere>` and tokenized the pieces separately
(BOS on the first piece only, sentencepiece's word-start marker at the start of every piece), then put one image's
soft tokens between pieces. This processor builds the same ids, with each image a run of `num_image_tokens`
image-token ids that the model replaces by the image features. A literal `<s>` / `</s>` in the text becomes the BOS /
EOS id, as with the original tokenizer.

For MiniGPT-v2 it also reads and writes the boxes of its grounding answers (`{<x1><y1><x2><y2>}`, 0-100 grid).
"""

import io
import os
import re


# First: importing the configuration checks the transformers release (one clear error when it is too old).
try:
    from .configuration_minigpt4 import (
        DEFAULT_IMAGE_TOKEN,
        DEFAULT_SYSTEM_PROMPT,
        IGNORE_INDEX,
        BlipImageProcessorPil,
        declare_sub_processors,
    )
except ImportError:
    if __package__:  # Hub remote code (a package in transformers_modules): the relative import is the real one
        raise
    # Installed as top-level modules (pip install .)
    from configuration_minigpt4 import (
        DEFAULT_IMAGE_TOKEN,
        DEFAULT_SYSTEM_PROMPT,
        IGNORE_INDEX,
        BlipImageProcessorPil,
        declare_sub_processors,
    )

import numpy as np  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402
from tokenizers import Tokenizer, normalizers  # noqa: E402
from transformers import AddedToken, BatchFeature, PreTrainedTokenizerFast, ProcessorMixin  # noqa: E402
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402
from transformers.processing_utils import MultiModalData  # noqa: E402


# The end of an assistant turn (`sep` of `CONV_VISION`, `minigpt4/conversation/conversation.py@22d8888`).
TURN_SEPARATOR = "###"

# Task identifiers of MiniGPT-v2, written at the start of the user's text (`[refer] where is the cat?`); the six the
# original trained (the datasets under `minigpt4/datasets/datasets/` and `demo_v2.py@d94738a`).
TASK_IDENTIFIERS = ("vqa", "caption", "grounding", "refer", "detection", "identify")

# The chat templates render the original `Conversation.get_prompt()` (`minigpt4/conversation/conversation.py@d94738a`,
# SINGLE style): `system + sep`, then `role + message + sep` per finished turn and the bare role for the open
# assistant turn. Image parts render as "<Img><ImageHere></Img>" and the parts of one message are joined by a space
# (the original's `Chat.ask`). The three pieces below are shared by every variant's template.

# Sets `system_message` (the variant's default unless the conversation starts with a system message) and drops it.
_SYSTEM_MESSAGE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_message = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
)
# Opens the loop over the turns: sets `text` (the message's parts joined) and `task` (the message's own `task`, or
# the template variable `task` for the last user message; v2 templates only).
_MESSAGE_TEXT = (
    "{%- set last = namespace(user=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set last.user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ('user', 'assistant') -%}{{- raise_exception('MiniGPT-4 chats take the roles "
    "system (first), user and assistant; got ' + message['role']) -}}{%- endif -%}"
    "{%- set message_task = message.get('task') or (task if task is defined and loop.index0 == last.user else none) "
    "-%}"
    "{%- if message_task and not tasks_allowed -%}{{- raise_exception('Task identifiers ([refer], [vqa], ...) are "
    "MiniGPT-v2 prompts; this model is another MiniGPT variant.') -}}{%- endif -%}"
    "{%- set tag = '' -%}"
    "{%- if message_task and message['role'] == 'user' -%}"
    "{%- set tag = '[' + (message_task | replace('[', '') | replace(']', '')) + ']' -%}"
    "{%- if tag[1:-1] not in ['" + "', '".join(TASK_IDENTIFIERS) + "'] -%}{{- raise_exception('Unknown task ' + "
    "message_task + '; MiniGPT-v2 knows " + ", ".join(TASK_IDENTIFIERS) + "') -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- set items = namespace(list=[], tagged=(tag == '')) -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{%- set items.list = items.list + ['<Img>" + DEFAULT_IMAGE_TOKEN + "</Img>'] -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- if not items.tagged and not part['text'].startswith(tag) -%}"
    "{%- set items.list = items.list + [tag + ' ' + part['text']] -%}"
    "{%- else -%}{%- set items.list = items.list + [part['text']] -%}{%- endif -%}"
    "{%- set items.tagged = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not items.tagged -%}{%- set items.list = items.list + [tag] -%}{%- endif -%}"
    "{%- set text = items.list | join(' ') -%}"
)
_END_OF_LOOP = "{%- endfor -%}"


def _chat_template(
    system: str, system_separator: str, user: tuple[str, str], assistant: tuple[str, str], open_assistant: str,
    tasks_allowed: bool, earlier_answers: str | None = None,
) -> str:
    """
    One variant's template: the system text (`system` unless the chat starts with a system message) followed by
    `system_separator`, each user turn as `user[0] + text + user[1]`, each finished assistant turn
    as `assistant[0] + text + assistant[1]` (or `assistant[0] + earlier_answers` unless the template variable
    `keep_previous_answers` is true), and `open_assistant` for the generation prompt.
    """
    def literal(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    if earlier_answers is None:
        answer = "{{- " + literal(assistant[0]) + " + text + " + literal(assistant[1]) + " -}}"
    else:
        answer = (
            "{%- if keep_previous_answers is defined and keep_previous_answers -%}"
            "{{- " + literal(assistant[0]) + " + text + " + literal(assistant[1]) + " -}}"
            "{%- else -%}{{- " + literal(assistant[0] + earlier_answers + assistant[1]) + " -}}{%- endif -%}"
        )
    return (
        "{%- set system_message = " + literal(system) + " -%}"
        "{%- set tasks_allowed = " + ("true" if tasks_allowed else "false") + " -%}"
        + _SYSTEM_MESSAGE
        + "{{- system_message + " + literal(system_separator) + " -}}"
        + _MESSAGE_TEXT
        + "{%- if message['role'] == 'user' -%}{{- " + literal(user[0]) + " + text + " + literal(user[1]) + " -}}"
        + "{%- else -%}" + answer + "{%- endif -%}"
        + _END_OF_LOOP
        + "{%- if add_generation_prompt -%}{{- " + literal(open_assistant) + " -}}{%- endif -%}"
    )


CHAT_TEMPLATES = {
    # `CONV_VISION_Vicuna0`: "SYSTEM###Human: <Img><ImageHere></Img> QUESTION###Assistant: ".
    "vicuna0": _chat_template(
        DEFAULT_SYSTEM_PROMPT, TURN_SEPARATOR, ("Human: ", TURN_SEPARATOR), ("Assistant: ", TURN_SEPARATOR),
        "Assistant: ", tasks_allowed=False,
    ),
    # `CONV_VISION_LLama2`: the Vicuna system text, then "<s>[INST] <Img><ImageHere></Img> QUESTION [/INST] ". The
    # literal "<s>" becomes a BOS id in the middle of the prompt, as it did in the original.
    "llama2": _chat_template(
        DEFAULT_SYSTEM_PROMPT, "", ("<s>[INST] ", ""), (" [/INST] ", ""), " [/INST] ", tasks_allowed=False,
    ),
    # `CONV_VISION_minigptv2` / `demo_v2.py`: "<s>[INST] <Img><ImageHere></Img> [task] QUESTION [/INST]", no system
    # text. The demo replaces every earlier answer by "</s>" (`chat_state.messages[-1][1] = '</s>'`); pass
    # `keep_previous_answers=True` to keep them instead.
    "v2": _chat_template(
        "", "", ("<s>[INST] ", ""), (" [/INST]", ""), " [/INST]", tasks_allowed=True, earlier_answers="</s>",
    ),
}
# The Vicuna v0 conversation, the default of a processor built without a template.
CHAT_TEMPLATE = CHAT_TEMPLATES["vicuna0"]


def sentencepiece_faithful_tokenizer(tokenizer, pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """
    Returns a fast copy of a LLaMA sentencepiece tokenizer that gives the original slow tokenizer's ids.

    transformers' LLaMA tokenizer adds the word-start marker "▁" only when the text does not already start with a
    space; sentencepiece (and so the original MiniGPT-4) always adds it. The copy normalises as sentencepiece does
    (prepend "▁", spaces -> "▁") and saves as a plain `tokenizer.json`, which reloads unchanged with `AutoTokenizer`.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    faithful = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=pad_token or tokenizer.pad_token or tokenizer.unk_token,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=tokenizer.model_max_length,
    )
    return faithful


def stop_token_ids_for(tokenizer, stop_text: str = TURN_SEPARATOR) -> list[list[int]]:
    """
    Every token-id sequence in which `tokenizer` can write `stop_text` (with or without the word-start marker "▁"),
    e.g. `[[835], [2277, 29937], ...]` for LLaMA's "###". Sequences that end with a shorter one are left out: the
    shorter one already stops generation there.
    """
    vocab = tokenizer.get_vocab()
    pieces = {piece: token_id for piece, token_id in vocab.items() if piece and piece in "▁" + stop_text}
    found: list[list[int]] = []

    def spell(rest: str, ids: list[int]) -> None:
        if not rest:
            found.append(ids)
            return
        for piece, token_id in pieces.items():
            if rest.startswith(piece):
                spell(rest[len(piece) :], ids + [token_id])

    spell(stop_text, [])
    spell("▁" + stop_text, [])
    found = sorted({tuple(ids) for ids in found}, key=lambda ids: (len(ids), ids))
    minimal: list[list[int]] = []
    for ids in found:
        if not any(len(shorter) < len(ids) and list(ids[-len(shorter) :]) == shorter for shorter in minimal):
            minimal.append(list(ids))
    if not minimal:
        raise ValueError(f"The tokenizer cannot write {stop_text!r}; pass stop_token_ids explicitly.")
    return minimal


def variant_stop_token_ids(tokenizer, variant: str) -> list[list[int]]:
    """
    The token-id sequences that end an answer of each variant: `###` for Vicuna v0 (its turn separator), EOS for
    MiniGPT-v2 (`demo_v2.py@d94738a`), and both for MiniGPT-4 with Llama-2, whose original demo passes the `###` ids
    while its model ends answers with EOS (EOS alone if the vocabulary cannot write `###`).
    """
    eos = [[tokenizer.eos_token_id]]
    if variant == "v2":
        return eos
    if variant == "llama2":
        try:
            return eos + stop_token_ids_for(tokenizer)
        except ValueError:  # a vocabulary without pieces for "#": EOS alone
            return eos
    return stop_token_ids_for(tokenizer)


def minigpt4_image_processor(image_size: int = 224) -> BlipImageProcessorPil:
    """
    The original `blip2_image_eval` transform (`minigpt4/processors/blip_processors.py@22d8888`): squash-resize to a
    square with PIL bicubic, CLIP mean/std.
    """
    return BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def load_rgb_image(image):
    """
    Returns `image` as the original saw it (`Chat.upload_img`, `minigpt4/conversation/conversation.py@22d8888`): a PIL
    image made RGB with `convert("RGB")` (alpha dropped, not composited).

    Accepts a PIL image, a file path, encoded image bytes, or a uint8 HxWxC array; float arrays and tensors pass
    through unchanged (they are taken as RGB). 16-bit and float grey images are scaled to 8 bits first (PIL's own
    conversion would clip them).
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        encoded = isinstance(image, (bytes, bytearray))
        source = "the image bytes" if encoded else os.fspath(image)
        # A truncated file is refused even when another library allowed truncated images process-wide (lmms-eval's
        # task module sets PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` on import); the setting is restored afterwards.
        truncated_allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with Image.open(io.BytesIO(image) if encoded else source) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError:
            raise ValueError(f"Image file not found: {source}") from None
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            raise ValueError(f"Could not read an image from {source}: {error}") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_allowed
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        return image
    if image.width < 1 or image.height < 1:
        raise ValueError(f"Got an empty image of size {image.size}.")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------------
# MiniGPT-v2 boxes: `{<x1><y1><x2><y2>}` with integers on a 0-100 grid of the original image (left, top, right,
# bottom), bound to a phrase as `<p>phrase</p> {<..>}`, several boxes of one phrase joined by `<delim>`
# (`minigpt4/datasets/datasets/coco_dataset.py@d94738a`; `demo_v2.py` parses and draws them).

BOX_GRID = 100
# A `{` followed by `<...>` groups, and the closing `}` if there is one.
_BOX_TEXT = re.compile(r"\{((?:\s*<[^<>{}]*>)+)\s*(\}?)")
_PHRASE_TEXT = re.compile(r"<p>(.*?)</p>", re.DOTALL)
_BETWEEN_BOXES = re.compile(r"(?:\s|<delim>)*")


class GroundedAnswer(list):
    """
    The boxes found in one answer, in order: a list of `{"phrase": str | None, "box": (x1, y1, x2, y2)}`, the box in
    pixels of the original image and the phrase `None` for a bare box (a `[refer]` answer).

    Attributes:
        problems (`list[str]`): box text that could not be read (wrong count, out of the grid, not closed, ...).
        text (`str`): the answer without box markup (`<p>`, `</p>`, `<delim>` and readable boxes removed).
    """

    def __init__(self, objects=(), problems=(), text: str = ""):
        super().__init__(objects)
        self.problems = list(problems)
        self.text = text


def _read_box(match: re.Match, image_size: tuple[int, int]) -> tuple[tuple[float, ...] | None, str | None]:
    """`(pixel box, None)` for well-formed box text, `(None, what is wrong)` otherwise."""
    values = re.findall(r"<\s*([^<>]*?)\s*>", match.group(1))
    shown = match.group(0).strip()
    if not match.group(2):
        return None, f"box {shown!r} is not closed with '}}'"
    if not all(re.fullmatch(r"[+-]?\d+", value) for value in values):
        return None, f"box {shown!r} holds something other than integers"
    if len(values) != 4:
        return None, f"box {shown!r} has {len(values)} numbers; a box has 4 (x1, y1, x2, y2)"
    numbers = [int(value) for value in values]
    if not all(0 <= number <= BOX_GRID for number in numbers):
        return None, f"box {shown!r} has numbers outside 0-{BOX_GRID}"
    width, height = image_size
    x1, y1, x2, y2 = numbers
    return (x1 * width / BOX_GRID, y1 * height / BOX_GRID, x2 * width / BOX_GRID, y2 * height / BOX_GRID), None


def parse_grounded_answer(text: str, image_size: tuple[int, int]) -> GroundedAnswer:
    """
    Reads the phrases and boxes of one MiniGPT-v2 answer.

    Args:
        text: the answer, e.g. `"<p>a cat</p> {<4><0><92><100>}"`, `"<p>sofas</p> {<57><49><70><72>}<delim>{...}"`
            or a bare `"{<4><0><92><100>}"`.
        image_size: `(width, height)` of the original image, in pixels.

    Returns:
        [`GroundedAnswer`]: one entry per readable box; malformed box text is listed in `.problems`, never raised.
    """
    phrases = [(match.start(), 0, match) for match in _PHRASE_TEXT.finditer(text)]
    boxes = [(match.start(), 1, match) for match in _BOX_TEXT.finditer(text)]
    events = sorted(phrases + boxes, key=lambda event: (event[0], event[1]))
    objects, problems, removed = [], [], []
    phrase, anchor = None, None  # the current phrase and where the text after it (or its last box) starts
    for _, is_box, match in events:
        if not is_box:
            phrase, anchor = " ".join(match.group(1).split()), match.end()
            continue
        bound = anchor is not None and _BETWEEN_BOXES.fullmatch(text, anchor, match.start()) is not None
        box, problem = _read_box(match, image_size)
        owner = phrase if bound else None
        if problem:
            problems.append(problem + (f" (phrase {owner!r})" if owner else ""))
        else:
            objects.append({"phrase": owner, "box": box})
            removed.append(match.span())
        anchor = match.end() if bound else None
    read = [match.span() for _, is_box, match in events if is_box]
    for start in (m.start() for m in re.finditer(r"\{<", text)):
        if not any(span_start <= start < span_end for span_start, span_end in read):
            problems.append(f"box text {text[start:start + 24]!r} cannot be read")
    plain = text
    for start, end in reversed(removed):
        plain = plain[:start] + plain[end:]
    plain = re.sub(r"<delim>|</?p>", "", plain)
    plain = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"[ \t]+", " ", plain)).strip()
    return GroundedAnswer(objects, problems, plain)


def format_box(box_pixels: tuple[float, float, float, float], image_size: tuple[int, int]) -> str:
    """
    Writes a pixel box `(x1, y1, x2, y2)` of an image of `image_size` `(width, height)` as MiniGPT-v2's box text
    `{<x1><y1><x2><y2>}` on the 0-100 grid, truncating as the original's datasets did (`int(x / width * 100)`), e.g.
    for an `[identify]` prompt: `"[identify] what is this " + format_box(...)`.
    """
    width, height = image_size
    x1, y1, x2, y2 = box_pixels
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(
            f"The box {tuple(box_pixels)} is not (left, top, right, bottom) inside a {width}x{height} image."
        )
    grid = [int(x1 / width * BOX_GRID), int(y1 / height * BOX_GRID), int(x2 / width * BOX_GRID),
            int(y2 / height * BOX_GRID)]
    return "{" + "".join(f"<{value}>" for value in grid) + "}"


@declare_sub_processors(image_processor=BlipImageProcessorPil.__name__, tokenizer="PreTrainedTokenizerFast")
class MiniGPT4Processor(ProcessorMixin):
    r"""
    Builds MiniGPT-4 inputs: `input_ids`/`attention_mask` (with image-token runs), `pixel_values`, and `labels`
    when a `suffix` (the training target) is given.

    Args:
        image_processor ([`BlipImageProcessorPil`]):
            Set up as the original eval transform (see [`minigpt4_image_processor`]).
        tokenizer ([`PreTrainedTokenizerFast`]):
            The LLaMA/Vicuna tokenizer (see [`sentencepiece_faithful_tokenizer`]). The image placeholder is added to
            it as a special token if missing, and `<unk>` becomes the pad token if it has none.
        num_image_tokens (`int`, defaults to 32):
            Image tokens per image; must equal the model config's `num_image_tokens` (32 queries for MiniGPT-4 with
            Vicuna, 64 for MiniGPT-4 with Llama-2, 256 for MiniGPT-v2).
        image_token (`str`, defaults to `"<ImageHere>"`):
            The placeholder that marks an image in the text.
        chat_template (`str`, *optional*):
            Jinja template; defaults to the original Vicuna-v0 conversation (`CHAT_TEMPLATES` holds every variant's).
        num_query_tokens (`int`, *optional*):
            The former name of `num_image_tokens` (processor folders saved before the Llama-2 / v2 variants).
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_image_tokens: int | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        chat_template: str | None = None,
        num_query_tokens: int | None = None,
        **kwargs,
    ):
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        self.num_image_tokens = num_image_tokens or num_query_tokens or 32
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        # Set while `apply_chat_template(tokenize=True)` runs: whether `__call__` puts BOS in front (see there).
        self._chat_add_special_tokens: bool | None = None
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @property
    def num_query_tokens(self) -> int:
        """The former name of `num_image_tokens`."""
        return self.num_image_tokens

    @classmethod
    def from_tokenizer(
        cls, tokenizer, image_size: int = 224, num_image_tokens: int = 32, **kwargs
    ) -> "MiniGPT4Processor":
        """Builds the processor around a tokenizer, with the original eval image transform at `image_size`."""
        num_image_tokens = kwargs.pop("num_query_tokens", None) or num_image_tokens
        return cls(minigpt4_image_processor(image_size), tokenizer, num_image_tokens=num_image_tokens, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs) -> list:
        """
        Loads the image processor and the tokenizer (in `__init__`'s order) as the classes they were saved from.

        transformers' Auto classes would pick BLIP's torchvision image processor whenever torchvision is installed
        (its bicubic resize gives other pixels than the original's PIL one), and would resolve the folder's
        remote-code model config to find the tokenizer class (asking whether to trust that code).
        """
        kwargs.pop("trust_remote_code", None)
        return [
            BlipImageProcessorPil.from_pretrained(pretrained_model_name_or_path, **kwargs),
            PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]

    # ----------------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        suffix: str | list[str | list[str]] | None = None,
        max_txt_len: int = 160,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        return_mm_token_type_ids: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image, a list of images (in placeholder order over the whole batch), or one list per text.
                PIL images, file paths or uint8 arrays; made RGB with PIL's `convert("RGB")`.
            text: prompt(s) with one `<ImageHere>` per image, e.g. the output of `apply_chat_template`, or an already
                formatted training prompt such as `"[INST] <Img><ImageHere></Img> Describe this image. [/INST] "`.
                Task identifiers (`[refer] ...`) are plain text at the start of the user's words, as in the original.
            suffix: training target(s), appended to the prompt as their own segment (append the variant's end
                symbol yourself: `"###"` for Vicuna v0, `"</s>"` for Llama-2 and v2, where the literal `"</s>"`
                becomes the EOS id, one labelled token, as in the original); builds `labels` with -100 everywhere else.
                The prompt gets one BOS: training prompts carry no literal `<s>`.
                A multi-turn training sample gives, instead of one answer, the list `[answer 1, question 2, answer 2,
                ...]`: every piece is tokenized on its own, the answers are labelled and the later questions (each
                starting with a literal `<s>`, e.g. `"<s>[INST] q2 [/INST]"`) are not, as the original's
                `tokenize_conversation` (`minigpt4/models/minigpt_base.py@d94738a`).
            max_txt_len: the suffix is cut to this many tokens (`max_txt_len` of
                `minigpt4/models/mini_gpt4.py@22d8888`).
            padding: pad to the longest row (`True`/`"longest"`) or to `max_length` (`"max_length"`).
            padding_side: `"left"` or `"right"`; defaults to right with a suffix (training), left otherwise
                (generation).
            max_length: longest allowed row; a longer prompt raises (image tokens cannot be cut).
            add_special_tokens: put BOS in front of each prompt (a literal `<s>` in the text adds another, as the
                original tokenizer did).
            return_tensors: `"pt"`, `"np"` or `None` (lists).
            return_mm_token_type_ids: also return `mm_token_type_ids`, 1 at image tokens and 0 elsewhere (what
                inference servers such as vLLM read to find the images).
        """
        if self._chat_add_special_tokens is not None:
            add_special_tokens = self._chat_add_special_tokens
        for name, value in (("videos", videos), ("audio", audio), ("audios", kwargs.pop("audios", None))):
            if value is not None and len(value) > 0:
                raise ValueError(f"MiniGPT-4 takes images and text only; got {name}.")
        if text is None:
            raise ValueError(
                "MiniGPT-4 needs a text prompt with one '<ImageHere>' per image; build one with "
                "`processor.apply_chat_template(messages, add_generation_prompt=True)`."
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        suffixes = None
        if suffix is not None:
            one_target = isinstance(suffix, str) or (isinstance(text, str) and _is_turn_list(suffix))
            suffixes = [suffix] if one_target else list(suffix)
            if len(suffixes) != len(texts):
                raise ValueError(f"Got {len(texts)} text(s) but {len(suffixes)} suffix(es); give one per text.")
        flat_images = self._match_images_to_texts(images, texts)

        input_ids = self._tokenize_prompts(texts, add_special_tokens)
        labels = None
        if suffixes is not None:
            suffix_ids, suffix_labels = self._tokenize_suffixes(suffixes, max_txt_len)
            labels = [[IGNORE_INDEX] * len(prompt) + row for prompt, row in zip(input_ids, suffix_labels)]
            input_ids = [prompt + ids for prompt, ids in zip(input_ids, suffix_ids)]
        if max_length is not None:
            for row, ids in enumerate(input_ids):
                if len(ids) > max_length:
                    raise ValueError(
                        f"Row {row} is {len(ids)} tokens long ({self.num_image_tokens} per image included), more "
                        f"than max_length={max_length}. Image tokens cannot be cut: shorten the text."
                    )

        data = self._pad(input_ids, labels, padding, padding_side or ("right" if suffixes else "left"), max_length)
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """
        [`ProcessorMixin.apply_chat_template`], with MiniGPT's template variables and the original's BOS rule.

        Template variables (keyword arguments): `task="refer"` (MiniGPT-v2) writes the task identifier `[refer]` at
        the start of the last user message's text, as a message's own `"task"` key does for that message;
        `keep_previous_answers=True` (MiniGPT-v2) keeps earlier answers in the prompt instead of the `</s>` the
        original demo put in their place.

        With `tokenize=True` the prompt gets the processor's BOS even when the template starts with a literal `<s>`
        (the original tokenized the rendered prompt with special tokens, so MiniGPT-v2's prompt starts with two BOS
        ids); `add_special_tokens=False` (here or in `processor_kwargs`) leaves it out.
        """
        if not kwargs.get("tokenize"):
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        add_special_tokens = kwargs.pop("add_special_tokens", True)
        if kwargs.get("processor_kwargs"):
            kwargs["processor_kwargs"] = dict(kwargs["processor_kwargs"])
            add_special_tokens = kwargs["processor_kwargs"].pop("add_special_tokens", add_special_tokens)
        self._chat_add_special_tokens = bool(add_special_tokens)
        try:
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        finally:
            self._chat_add_special_tokens = None

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """
        The number of image tokens each image of `image_sizes` (height, width) becomes: `num_image_tokens`, whatever
        its size (every image is resized to the model's square input, one patch grid).
        """
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    def _match_images_to_texts(self, images, texts: list[str]) -> list:
        """Flattens `images` in placeholder order and checks the counts against the texts' placeholders."""
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(item, (list, tuple)) for item in images)
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"Got {len(texts)} text(s) but {len(images)} image list(s); give one list per text.")
            for row, (row_images, count) in enumerate(zip(images, counts)):
                if len(row_images) != count:
                    raise ValueError(
                        f"Text {row} has {count} '{self.image_token}' placeholder(s) but {len(row_images)} image(s) "
                        "were given for it; put one placeholder where each image belongs."
                    )
            images = [image for row_images in images for image in row_images]
        if len(images) != sum(counts):
            raise ValueError(
                f"The text has {sum(counts)} '{self.image_token}' placeholder(s) but {len(images)} image(s) were "
                "given; put one '<Img><ImageHere></Img>' where each image belongs (apply_chat_template does this)."
            )
        return [load_rgb_image(image) for image in images]

    def _tokenize_prompts(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """
        Tokenizes each text piece between placeholders on its own, as the original did (`get_context_emb` in
        `minigpt4/models/minigpt_base.py@d94738a`): BOS in front when `add_special_tokens`, and a literal `<s>` in the
        text is one more BOS id (MiniGPT-v2's "<s>[INST] ..." prompt starts with two, as in the original demo).
        """
        bos_id = self.tokenizer.bos_token_id
        pieces_per_text = [text.split(self.image_token) for text in texts]
        all_pieces = [piece for pieces in pieces_per_text for piece in pieces if piece]
        piece_ids = iter(self.tokenizer(all_pieces, add_special_tokens=False)["input_ids"] if all_pieces else [])

        image_run = [self.image_token_id] * self.num_image_tokens
        input_ids = []
        for pieces in pieces_per_text:
            ids = [bos_id] if add_special_tokens and bos_id is not None else []
            for index, piece in enumerate(pieces):
                if index > 0:
                    ids.extend(image_run)
                if piece:
                    ids.extend(next(piece_ids))
            input_ids.append(ids)
        return input_ids

    def _tokenize_suffixes(self, suffixes: list, max_txt_len: int) -> tuple[list[list[int]], list[list[int]]]:
        """
        `(ids, labels)` per text of the training targets, cut to `max_txt_len` tokens together. A suffix is one
        answer (all labelled) or a list `[answer, question, answer, ...]` whose pieces are tokenized separately, the
        answers (even places) labelled and the questions (odd places) not.
        """
        pieces = [[suffix] if isinstance(suffix, str) else list(suffix) for suffix in suffixes]
        flat = [piece for row in pieces for piece in row]
        piece_ids = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        ids_rows, label_rows = [], []
        for row in pieces:
            ids, labels = [], []
            for place in range(len(row)):
                segment = next(piece_ids)
                ids += segment
                labels += segment if place % 2 == 0 else [IGNORE_INDEX] * len(segment)
            ids_rows.append(ids[:max_txt_len])
            label_rows.append(labels[:max_txt_len])
        return ids_rows, label_rows

    def _pad(self, input_ids, labels, padding, padding_side: str, max_length: int | None) -> dict:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        lengths = [len(ids) for ids in input_ids]
        if padding is False or padding == "do_not_pad":
            target = None
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length.")
            target = max_length
        else:
            target = max(lengths)
        data = {"input_ids": [], "attention_mask": []}
        if labels is not None:
            data["labels"] = []
        for row, ids in enumerate(input_ids):
            pad = 0 if target is None else target - len(ids)

            def padded(values, fill, pad=pad):
                return [fill] * pad + values if padding_side == "left" else values + [fill] * pad

            data["input_ids"].append(padded(ids, self.tokenizer.pad_token_id))
            data["attention_mask"].append(padded([1] * len(ids), 0))
            if labels is not None:
                data["labels"].append(padded(labels[row], IGNORE_INDEX))
        return data

    # ----------------------------------------------------------------------------------------------------------------
    # Decoding.

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes generated ids (prompt included, as `generate` returns them), dropping a trailing `###`."""
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [strip_turn_separator(text) for text in texts]

    def post_process_grounding(
        self, texts: list[str], image_sizes: list[tuple[int, int]]
    ) -> list[GroundedAnswer]:
        """
        The phrases and pixel boxes of MiniGPT-v2 answers (see [`parse_grounded_answer`]).

        Args:
            texts: decoded answers (e.g. from `decode_answers`).
            image_sizes: `(width, height)` of each answer's original image.

        Returns:
            One [`GroundedAnswer`] per text: a list of `{"phrase": str | None, "box": (x1, y1, x2, y2)}` in pixels,
            with `.problems` (malformed box text, reported, never raised) and `.text` (the answer without markup).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        image_sizes = list(image_sizes)
        if len(texts) != len(image_sizes):
            raise ValueError(f"Got {len(texts)} text(s) but {len(image_sizes)} image size(s); give one per text.")
        return [parse_grounded_answer(text, size) for text, size in zip(texts, image_sizes)]

    format_box = staticmethod(format_box)

    def decode_answers(self, generated_ids, prompt_length: int = 0) -> list[str]:
        """
        The assistant's answers as `Chat.answer` (`minigpt4/conversation/conversation.py@22d8888`) post-processed them:
        the new tokens after `prompt_length`, decoded without special tokens, cut at the first `###`, after the last
        `Assistant:`, stripped.
        """
        texts = self.tokenizer.batch_decode(
            [list(ids)[prompt_length:] for ids in generated_ids], skip_special_tokens=True
        )
        return [text.split(TURN_SEPARATOR)[0].split("Assistant:")[-1].strip() for text in texts]


def _is_turn_list(suffix) -> bool:
    """Whether `suffix` is one multi-turn target `[answer, question, answer, ...]` (strings), not one per text."""
    return isinstance(suffix, (list, tuple)) and len(suffix) > 1 and all(isinstance(piece, str) for piece in suffix)


def strip_turn_separator(text: str) -> str:
    """Removes the end-of-turn marker `###` (and what follows it) from the end of a generated answer."""
    stripped = text.rstrip()
    return stripped[: -len(TURN_SEPARATOR)] if stripped.endswith(TURN_SEPARATOR) else text


MiniGPT4Processor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MiniGPT4Processor",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATES",
    "TASK_IDENTIFIERS",
    "GroundedAnswer",
    "format_box",
    "parse_grounded_answer",
    "IGNORE_INDEX",
    "load_rgb_image",
    "minigpt4_image_processor",
    "sentencepiece_faithful_tokenizer",
    "stop_token_ids_for",
    "variant_stop_token_ids",
    "strip_turn_separator",
]
