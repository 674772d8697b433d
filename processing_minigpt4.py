"""MiniGPT-4 processor: images as the original eval transform, prompts tokenized exactly as the original did.

The original split a prompt at each `<ImageHere>` and tokenized the pieces separately (BOS on the first piece only,
sentencepiece's word-start marker at the start of every piece), then put one image's 32 soft tokens between pieces.
This processor builds the same ids, with each image a run of `num_query_tokens` image-token ids that the model replaces
by the image features.
"""

import io
import os


# First: importing the configuration checks the transformers release (one clear error when it is too old).
try:
    from .configuration_minigpt4 import (
        DEFAULT_IMAGE_TOKEN,
        DEFAULT_SYSTEM_PROMPT,
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
        BlipImageProcessorPil,
        declare_sub_processors,
    )

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, normalizers  # noqa: E402
from transformers import AddedToken, BatchFeature, PreTrainedTokenizerFast, ProcessorMixin  # noqa: E402
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402


IGNORE_INDEX = -100
# The end of an assistant turn (the original's `sep`).
TURN_SEPARATOR = "###"

# `CONV_VISION_Vicuna0` of the original: "SYSTEM###Human: <Img><ImageHere></Img> QUESTION###Assistant: ".
# A finished turn is "ROLE: MESSAGE###"; the open assistant turn is "Assistant: ". Image parts render as
# "<Img><ImageHere></Img>" and the parts of one message are joined by a space (as the original's `Chat.ask` did).
CHAT_TEMPLATE = (
    "{%- set system_message = '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_message = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- system_message + '###' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = 'Human' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role = 'Assistant' -%}"
    "{%- else -%}{{- raise_exception('MiniGPT-4 chats take the roles system (first), user and assistant; got ' "
    "+ message['role']) -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(items=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.items = parts.items + ['<Img>" + DEFAULT_IMAGE_TOKEN + "</Img>'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.items = parts.items + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = parts.items | join(' ') -%}{%- endif -%}"
    "{{- role + ': ' + text + '###' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


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


def minigpt4_image_processor(image_size: int = 224) -> BlipImageProcessorPil:
    """The original `blip2_image_eval` transform: squash-resize to a square with PIL bicubic, CLIP mean/std."""
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
    Returns `image` as the original saw it: a PIL image made RGB with `convert("RGB")` (alpha dropped, not composited).

    Accepts a PIL image, a file path, encoded image bytes, or a uint8 HxWxC array; float arrays and tensors pass
    through unchanged (they are taken as RGB). 16-bit and float grey images are scaled to 8 bits first (PIL's own
    conversion would clip them).
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        encoded = isinstance(image, (bytes, bytearray))
        source = "the image bytes" if encoded else os.fspath(image)
        try:
            with Image.open(io.BytesIO(image) if encoded else source) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError:
            raise ValueError(f"Image file not found: {source}") from None
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            raise ValueError(f"Could not read an image from {source}: {error}") from None
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
        num_query_tokens (`int`, defaults to 32):
            Image tokens per image; must equal the model config's `num_query_tokens`.
        image_token (`str`, defaults to `"<ImageHere>"`):
            The placeholder that marks an image in the text.
        chat_template (`str`, *optional*):
            Jinja template; defaults to the original Vicuna-v0 conversation.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        num_query_tokens: int = 32,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        chat_template: str | None = None,
        **kwargs,
    ):
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        self.num_query_tokens = num_query_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, image_size: int = 224, num_query_tokens: int = 32, **kwargs
    ) -> "MiniGPT4Processor":
        """Builds the processor around a tokenizer, with the original eval image transform at `image_size`."""
        return cls(minigpt4_image_processor(image_size), tokenizer, num_query_tokens=num_query_tokens, **kwargs)

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
        suffix: str | list[str] | None = None,
        max_txt_len: int = 160,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: one image, a list of images (in placeholder order over the whole batch), or one list per text.
                PIL images, file paths or uint8 arrays; made RGB with PIL's `convert("RGB")`.
            text: prompt(s) with one `<ImageHere>` per image, e.g. the output of `apply_chat_template`.
            suffix: training target(s), appended to the prompt as their own segment (append the end symbol
                yourself, e.g. `"###"`); builds `labels` with -100 everywhere else.
            max_txt_len: the suffix is cut to this many tokens (the original's `max_txt_len`).
            padding: pad to the longest row (`True`/`"longest"`) or to `max_length` (`"max_length"`).
            padding_side: `"left"` or `"right"`; defaults to right with a suffix (training), left otherwise
                (generation).
            max_length: longest allowed row; a longer prompt raises (image tokens cannot be cut).
            add_special_tokens: put BOS in front of each prompt.
            return_tensors: `"pt"`, `"np"` or `None` (lists).
        """
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
            suffixes = [suffix] if isinstance(suffix, str) else list(suffix)
            if len(suffixes) != len(texts):
                raise ValueError(f"Got {len(texts)} text(s) but {len(suffixes)} suffix(es); give one per text.")
        flat_images = self._match_images_to_texts(images, texts)

        input_ids = self._tokenize_prompts(texts, add_special_tokens)
        labels = None
        if suffixes is not None:
            suffix_ids = self.tokenizer(suffixes, add_special_tokens=False)["input_ids"]
            suffix_ids = [ids[:max_txt_len] for ids in suffix_ids]
            labels = [[IGNORE_INDEX] * len(prompt) + ids for prompt, ids in zip(input_ids, suffix_ids)]
            input_ids = [prompt + ids for prompt, ids in zip(input_ids, suffix_ids)]
        if max_length is not None:
            for row, ids in enumerate(input_ids):
                if len(ids) > max_length:
                    raise ValueError(
                        f"Row {row} is {len(ids)} tokens long ({self.num_query_tokens} per image included), more "
                        f"than max_length={max_length}. Image tokens cannot be cut: shorten the text."
                    )

        data = self._pad(input_ids, labels, padding, padding_side or ("right" if suffixes else "left"), max_length)
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

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
        """Tokenizes each text piece between placeholders on its own, as the original did."""
        bos_token, bos_id = self.tokenizer.bos_token, self.tokenizer.bos_token_id
        pieces_per_text = []
        for text in texts:
            pieces = text.split(self.image_token)
            if add_special_tokens and bos_token and pieces[0].startswith(bos_token):
                pieces[0] = pieces[0][len(bos_token) :]
            pieces_per_text.append(pieces)
        all_pieces = [piece for pieces in pieces_per_text for piece in pieces if piece]
        piece_ids = iter(self.tokenizer(all_pieces, add_special_tokens=False)["input_ids"] if all_pieces else [])

        image_run = [self.image_token_id] * self.num_query_tokens
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

    def decode_answers(self, generated_ids, prompt_length: int = 0) -> list[str]:
        """
        The assistant's answers as the original `Chat.answer` post-processed them: the new tokens after
        `prompt_length`, decoded without special tokens, cut at the first `###`, after the last `Assistant:`,
        stripped.
        """
        texts = self.tokenizer.batch_decode(
            [list(ids)[prompt_length:] for ids in generated_ids], skip_special_tokens=True
        )
        return [text.split(TURN_SEPARATOR)[0].split("Assistant:")[-1].strip() for text in texts]


def strip_turn_separator(text: str) -> str:
    """Removes the end-of-turn marker `###` (and what follows it) from the end of a generated answer."""
    stripped = text.rstrip()
    return stripped[: -len(TURN_SEPARATOR)] if stripped.endswith(TURN_SEPARATOR) else text


MiniGPT4Processor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MiniGPT4Processor",
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "load_rgb_image",
    "minigpt4_image_processor",
    "sentencepiece_faithful_tokenizer",
    "stop_token_ids_for",
    "strip_turn_separator",
]
