"""
The MiniGPT-4 training recipe as reusable pieces: data sources, per-sample formatting, the collator, the original's
optimizer groups and learning-rate schedule, model preparation (freezing, projection warm start, LoRA) and saving.

`minigpt4-train` (minigpt4_hf/cli/train.py) wires these into a stock `transformers.Trainer`; other tools reuse
the loaders and the projection helpers. The values and behaviours follow the original two-stage recipe (Vision-CAIR
MiniGPT-4 `train_configs/minigpt4_stage{1,2}_*.yaml`, `blip_processors.py`, `common/optims.py`).

Presets exist for every released variant (`TRAINING_PRESETS[variant][stage]`): MiniGPT-4 with Vicuna v0 (stages 1
and 2), MiniGPT-4 with Llama-2 (stages 1 and 2, `train_configs/minigpt4_llama2_stage*.yaml`) and MiniGPT-v2's
fine-tuning (stage 3, `train_configs/minigptv2_finetune.yaml`: LoRA, 448 px, task instructions, multi-turn
conversations, a weighted mixture of datasets).

Data flow of one training sample:
    source row (cc_sbu_align entry / webdataset sample / HF dataset row)
    -> record {"image": bytes|path|PIL|None, "text": answer, "instruction": str|None, "conversation": turns|None,
       "sample_id": str}
    -> `SampleFormatter`: decoded RGB image, RandomResizedCrop to the model's size (or a plain resize),
       prompt "<ImageHere>" (stage 1), one of the alignment prompts in the variant's template (stage 2), or the
       record's own instruction in it (`[INST] <Img><ImageHere></Img> [refer] where is the cat?  [/INST]`),
       target = answer (cleaned in stage 1) + end symbol; a conversation's target is the list
       [answer 1 + end, "<s>" + question 2 in the template, answer 2 + end, ...]
    -> `TrainingCollator`: `processor(images, text=prompts, suffix=targets)` -> input_ids, attention_mask,
       pixel_values, labels (-100 everywhere but the answers' tokens).
"""

import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from PIL import Image
from torch import nn
from transformers import Trainer, TrainerCallback

from configuration_minigpt4 import DEFAULT_IMAGE_TOKEN
from minigpt4_hf.files import atomic_path
from minigpt4_hf.inputs import check_data_path, find_webdataset_shards
from minigpt4_hf.recipe import (  # noqa: F401 (the presets and templates are part of this module's API)
    ALIGNMENT_PROMPTS,
    BOS_TEXT,
    CAPTION_MAX_WORDS,
    IMAGE_INSTRUCTION_FORMAT,
    IMAGE_TRANSFORMS,
    LLAMA2_PROMPT_TEMPLATE,
    STAGE2_PROMPT_TEMPLATE,
    STAGE_PRESETS,
    TRAINING_PRESETS,
    V2_IMAGE_INSTRUCTION_FORMAT,
    V2_PROMPT_TEMPLATE,
)
from processing_minigpt4 import load_rgb_image


logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# The original recipe: its values live in minigpt4_hf/recipe.py.


def clean_caption(caption: str, max_words: int = CAPTION_MAX_WORDS) -> str:
    """
    The original `blip_caption` text processor (`BlipCaptionProcessor.pre_caption`): lowercase, each of
    `. ! " ( ) * # : ; ~` replaced by a space, runs of whitespace collapsed, stripped, cut to `max_words` words.
    """
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def expand_prompts(prompt_template: str, prompts: Sequence[str]) -> list[str]:
    """The original's `prompt_list`: each instruction holding `<ImageHere>` put into the template."""
    usable = [prompt for prompt in prompts if DEFAULT_IMAGE_TOKEN in prompt]
    if not usable:
        raise ValueError(f"None of the {len(prompts)} prompt(s) contains {DEFAULT_IMAGE_TOKEN!r}; each needs one.")
    return [prompt_template.format(prompt) for prompt in usable]


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Reads an `alignment.txt`-style file: one instruction per line; lines without `<ImageHere>` are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if DEFAULT_IMAGE_TOKEN in line]
    if not prompts:
        raise ValueError(f"{path} has no line containing {DEFAULT_IMAGE_TOKEN!r}; write one instruction per line.")
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# Training image transform (`blip2_image_train` without the tensor part, which the processor does).


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """
    Samples a crop as torchvision's `RandomResizedCrop.get_params` does: up to 10 tries of an area fraction uniform
    in `scale` and a log-uniform aspect ratio in `ratio`; if none fits, a center crop clamped to `ratio`.

    Returns:
        `(left, top, crop_width, crop_height)` in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


@dataclass
class TrainingImageTransform:
    """
    The image side of a training sample, on PIL images; the processor then only scales and normalises (its resize
    is a no-op on an image already `size` x `size`).

    - `"random_resized_crop"`: the original `blip2_image_train` (which trained the released weights):
      RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic), no flip.
    - `"resize"`: the plain bicubic squash to `size` x `size` of the repo's later versions (= the eval transform).
    """

    size: int
    mode: str = "random_resized_crop"
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.mode not in IMAGE_TRANSFORMS:
            raise ValueError(f"Unknown image transform {self.mode!r}; choose one of {', '.join(IMAGE_TRANSFORMS)}.")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"The crop scale range must satisfy 0 < min <= max <= 1, got {self.scale}.")

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        if self.mode == "resize":
            return image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        left, top, crop_width, crop_height = random_resized_crop_box(
            image.width, image.height, rng, self.scale, self.ratio
        )
        crop = image.crop((left, top, left + crop_width, top + crop_height))
        return crop.resize((self.size, self.size), Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------------------------------------
# Samples: decoding, skipping unreadable images, formatting prompt and target.


class UnusableSampleError(ValueError):
    """A sample whose image is missing or cannot be decoded, or whose caption is empty."""


class SkippedImages:
    """
    Counts and logs the samples skipped for an unreadable or missing image (each id logged once). With
    `--dataloader_num_workers` > 0 the workers keep their own counts: their skips are in the log, not in `summary`.
    """

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def record(self, sample_id: str, reason: str) -> None:
        if sample_id not in self.reasons:
            self.reasons[sample_id] = reason
            logger.warning("Skipping sample %s: %s", sample_id, reason)

    @property
    def count(self) -> int:
        return len(self.reasons)

    def summary(self) -> str:
        if not self.reasons:
            return "No sample was skipped for its image."
        listed = ", ".join(list(self.reasons)[:20]) + (", ..." if len(self.reasons) > 20 else "")
        return f"Skipped {len(self.reasons)} sample(s) with an unreadable or missing image: {listed}"


def open_image(value: Any, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """
    Decodes one record image into an RGB PIL image.

    Args:
        value: encoded bytes, `{"bytes": ..., "path": ...}` (a `datasets.Image(decode=False)` value), a file path
            (relative paths are taken from `base_dir` when they do not exist as given), or a PIL image.
    Raises:
        UnusableSampleError: the file is missing or is not a readable image.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise UnusableSampleError("the record has no image")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and not path.exists() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise UnusableSampleError(f"image file not found: {path}")
        value = path
    try:
        image = load_rgb_image(value)
    except ValueError as error:
        raise UnusableSampleError(str(error)) from None
    if not isinstance(image, Image.Image):
        raise UnusableSampleError(f"unsupported image value of type {type(value).__name__}")
    return image


def sample_rng(seed: int, epoch: int, sample_key: str | int) -> random.Random:
    """
    The random source of one sample in one epoch (crop and prompt choice). It depends only on the seed, the epoch and
    the sample, so a resumed run, a run on N processes and a run on 1 process draw the same values for a sample.
    """
    return random.Random(f"{seed}:{epoch}:{sample_key}")


@dataclass
class SampleFormatter:
    """
    Turns a record into what the collator needs: `{"image": PIL (size x size) or None, "prompt": str, "target": str
    or list[str], "sample_id": str}`.

    A record with an `instruction` is prompted with it (put with its image by `instruction_format`, then into
    `prompt_template`); one with a `conversation` (multi-turn, see `conversation_turns`) gets its first question as
    the prompt and the list `[answer 1, "<s>" + question 2, answer 2, ...]` as the target, as the original's
    conversation datasets and `tokenize_conversation`; a plain caption record gets one of `prompts`. A record with an
    instruction or a conversation but no image is a text-only sample.

    Args:
        image_transform: the training image transform (size = the model's image size).
        prompts: full prompts, each with one `<ImageHere>` (stage 2: the four alignment prompts in the template), one
            drawn at random per sample; empty for no prompt (stage 1: the text is `<ImageHere>` alone).
        end_symbol: appended to each answer (`end_sym`: `"\\n"` in stage 1, `"###"` in stage 2, `"</s>"` for Llama-2
            and MiniGPT-v2, which the processor reads as the EOS id).
        clean_captions: apply `clean_caption` (the `blip_caption` processor; stage 1).
        max_caption_words: word limit of `clean_caption`.
        prompt_template: wraps a record's instruction and each question of a conversation (`"[INST] {} [/INST]"`);
            empty: used as they are.
        instruction_format: puts an instruction (and a conversation's first question) with the image, unless it
            holds `<ImageHere>` itself (MiniGPT-v2: `"<Img><ImageHere></Img> {} "`).
        followup_format: the later questions of a conversation (MiniGPT-v2: `"{} "`).
    """

    image_transform: TrainingImageTransform
    prompts: list[str] = field(default_factory=list)
    end_symbol: str = "###"
    clean_captions: bool = False
    max_caption_words: int = CAPTION_MAX_WORDS
    prompt_template: str = ""
    instruction_format: str = IMAGE_INSTRUCTION_FORMAT
    followup_format: str = "{}"

    def __call__(self, record: dict, rng: random.Random, base_dir: str | os.PathLike | None = None) -> dict:
        turns = conversation_turns(record.get("conversation"))
        instruction = record.get("instruction")
        instruction = instruction.strip() if isinstance(instruction, str) and instruction.strip() else None
        if turns:
            answer = turns[0][1]
        else:
            answer = record.get("text")
            if not isinstance(answer, str) or not answer.strip():
                raise UnusableSampleError("the record has no caption text")
        text_only = record.get("image") is None and (turns or instruction)
        image = None if text_only else self.image_transform(open_image(record.get("image"), base_dir), rng)
        if turns:
            first_question = turns[0][0].replace("<image>", "").replace("\n", "").strip()
            prompt = self._wrap(self._with_image(first_question, image is not None))
            target = [answer + self.end_symbol]
            for question, later_answer in turns[1:]:
                target += [BOS_TEXT + self._wrap(self.followup_format.format(question)), later_answer + self.end_symbol]
            target = target[0] if len(target) == 1 else target
        else:
            caption = clean_caption(answer, self.max_caption_words) if self.clean_captions else answer
            if instruction is not None:
                prompt = self._wrap(self._with_image(instruction, image is not None))
            else:
                prompt = rng.choice(self.prompts) if self.prompts else DEFAULT_IMAGE_TOKEN
            target = caption + self.end_symbol
        return {"image": image, "prompt": prompt, "target": target, "sample_id": str(record.get("sample_id"))}

    def _with_image(self, instruction: str, has_image: bool) -> str:
        if DEFAULT_IMAGE_TOKEN in instruction:
            if not has_image:
                raise UnusableSampleError(f"the instruction has {DEFAULT_IMAGE_TOKEN} but the record has no image")
            return instruction
        return self.instruction_format.format(instruction) if has_image else instruction

    def _wrap(self, text: str) -> str:
        return self.prompt_template.format(text) if self.prompt_template else text


# Who speaks in a conversation record: LLaVA's `{"from": "human" | "gpt", "value"}` or chat messages'
# `{"role": "user" | "assistant", "content"}`.
_QUESTION_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant")


def conversation_turns(value: Any) -> list[tuple[str, str]]:
    """
    The `(question, answer)` pairs of a conversation record: a list (or its JSON text) of LLaVA turns
    (`{"from": "human"|"gpt", "value": ...}`) or chat messages (`{"role": "user"|"assistant", "content": ...}`),
    alternating, starting with a question and ending with an answer. None or empty: no conversation.

    Raises:
        UnusableSampleError: turns out of order, unknown speakers, or not text.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise UnusableSampleError(f"the conversation is not valid JSON ({error})") from None
    texts, speakers = [], []
    for turn in value:
        if not isinstance(turn, dict):
            raise UnusableSampleError(f"a conversation turn is a {type(turn).__name__}, not a dict")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if isinstance(text, list):  # chat-message parts: the text parts
            text = " ".join(part.get("text", "") for part in text if isinstance(part, dict) and part.get("type") == "text")
        if not isinstance(text, str):
            raise UnusableSampleError(f"a conversation turn of {speaker!r} has no text")
        speakers.append(speaker)
        texts.append(text)
    expected = [_QUESTION_ROLES if index % 2 == 0 else _ANSWER_ROLES for index in range(len(speakers))]
    if not speakers or len(speakers) % 2 or any(who not in roles for who, roles in zip(speakers, expected)):
        raise UnusableSampleError(
            f"the conversation's turns {speakers} do not alternate question (human/user) and answer (gpt/assistant), "
            "starting with a question and ending with an answer"
        )
    return list(zip(texts[0::2], texts[1::2]))


class ImageTextDataset(torch.utils.data.Dataset):
    """
    Map-style training samples over any `datasets.Dataset` (or list) of records.

    A sample whose image is unreadable is skipped: it is counted and logged (its id), and its place in the batch is
    taken by the next readable sample, so batches keep their size and every process sees the same data.

    Args:
        records: rows with an image, a text and optionally an id, instruction or conversation, in the columns
            `columns` names.
        columns: `{"image": name, "text": name, "id": name or None}`, optionally `"instruction"` and
            `"conversation"` (see `row_to_record`).
        formatter: the per-sample formatting.
        seed: seeds the per-sample crop and prompt draws (with the epoch, see `sample_rng`).
        base_dir: where relative image paths start.
    """

    def __init__(self, records, columns: dict[str, str | None], formatter: SampleFormatter, seed: int = 42,
                 base_dir: str | os.PathLike | None = None, skipped: SkippedImages | None = None):
        if len(records) == 0:
            raise ValueError("The training data has no samples.")
        self.records = records
        self.columns = columns
        self.formatter = formatter
        self.seed = seed
        self.base_dir = base_dir
        self.skipped = skipped if skipped is not None else SkippedImages()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def record_at(self, index: int) -> dict:
        return row_to_record(self.records[index], self.columns, index)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            record = self.record_at(current)
            if record["sample_id"] in self.skipped.reasons:
                continue
            try:
                return self.formatter(record, sample_rng(self.seed, self.epoch, current), self.base_dir)
            except UnusableSampleError as error:
                self.skipped.record(record["sample_id"], str(error))
        raise RuntimeError(f"No sample of the training data has a readable image. {self.skipped.summary()}")


class StreamSampleFormatter:
    """
    The map function of a streamed dataset: formats a record (see `SampleFormatter`). Its random source depends on
    the seed, the sample and the record's position in this process's stream, so each pass over repeated data draws
    new crops and prompts while a resumed run (which replays the stream up to its checkpoint) draws the same ones.
    An unreadable record is counted, logged and returned marked (`"unreadable"` holds the reason) for the filter
    that follows to drop it.
    """

    # An endless stream of nothing but unusable records would otherwise spin forever.
    MAX_CONSECUTIVE_UNUSABLE = 1000

    def __init__(self, formatter: SampleFormatter, seed: int = 42, skipped: SkippedImages | None = None):
        self.formatter = formatter
        self.seed = seed
        self.skipped = skipped if skipped is not None else SkippedImages()
        self.position = 0
        self.consecutive_unusable = 0

    def __call__(self, record: dict) -> dict:
        rng = sample_rng(self.seed, 0, f"{self.position}:{record['sample_id']}")
        self.position += 1
        try:
            sample = {**self.formatter(record, rng), "unreadable": ""}
            self.consecutive_unusable = 0
            return sample
        except UnusableSampleError as error:
            self.skipped.record(record["sample_id"], str(error))
            self.consecutive_unusable += 1
            if self.consecutive_unusable >= self.MAX_CONSECUTIVE_UNUSABLE:
                raise RuntimeError(
                    f"The last {self.consecutive_unusable} streamed samples were all unusable (latest: "
                    f"{record['sample_id']}: {error}). Check the shards' image member (--image_column) and captions."
                ) from None
            return {"image": None, "prompt": "", "target": "", "sample_id": record["sample_id"],
                    "unreadable": str(error)}


def _is_readable(sample: dict) -> bool:
    return not sample["unreadable"]


@dataclass
class TrainingData:
    """
    What `build_training_dataset` returns: the dataset for the Trainer (an `ImageTextDataset`, or a streaming
    `datasets.IterableDataset` of formatted samples), the shared record of skipped samples, and what must hear of
    each new epoch (see `SetEpochCallback`).
    """

    dataset: Any
    skipped: SkippedImages
    epoch_listeners: list = field(default_factory=list)

    @property
    def is_streaming(self) -> bool:
        return not isinstance(self.dataset, ImageTextDataset)

    def set_epoch(self, epoch: int) -> None:
        for listener in self.epoch_listeners:
            listener.set_epoch(epoch)


# ----------------------------------------------------------------------------------------------------------------------
# Data sources.

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_path", "file_name", "path")
TEXT_COLUMN_CANDIDATES = ("caption", "text", "description", "answer", "txt", "caption_en")
ID_COLUMN_CANDIDATES = ("image_id", "id", "__key__", "key")
# A task instruction per row (MiniGPT-v2's `instruction_input`), and a multi-turn conversation per row.
INSTRUCTION_COLUMN_CANDIDATES = ("instruction", "instruction_input", "question")
CONVERSATION_COLUMN_CANDIDATES = ("conversations", "conversation", "messages")
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _record_features():
    import datasets

    return datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string"),
                              "instruction": datasets.Value("string"), "conversation": datasets.Value("string"),
                              "sample_id": datasets.Value("string")})


def row_to_record(row: dict, columns: dict[str, str | None], index: int, base_dir: str | None = None) -> dict:
    """
    One data row as a training record: `{"image", "text", "instruction", "conversation", "sample_id"}`, each from the
    column `columns` names for it (None: absent). The conversation is kept as JSON text (one type for every source
    of a mixture); `conversation_turns` reads it. With `base_dir`, relative image paths are made absolute.
    """
    def column(name: str):
        return row[columns[name]] if columns.get(name) else None

    image = column("image")
    if isinstance(image, str):
        image = {"bytes": None, "path": image}
    if base_dir is not None and isinstance(image, dict) and image.get("path") and not image.get("bytes"):
        path = Path(image["path"])
        if not path.is_absolute() and not path.exists():
            image = {"bytes": None, "path": str(Path(base_dir) / path)}
    conversation = column("conversation")
    if conversation is not None and not isinstance(conversation, str):
        conversation = json.dumps(conversation, ensure_ascii=False)
    sample_id = column("id")
    return {"image": image, "text": column("text"), "instruction": column("instruction"),
            "conversation": conversation, "sample_id": str(index if sample_id is None else sample_id)}


def _pick_column(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, source: str,
                 required: bool = True) -> str | None:
    if wanted:
        if wanted not in names:
            raise ValueError(f"{source} has no column {wanted!r} (the {what} column); its columns: {list(names)}.")
        return wanted
    for candidate in candidates:
        if candidate in names:
            return candidate
    if not required:
        return None
    raise ValueError(
        f"Cannot tell which column of {source} holds the {what}; its columns: {list(names)}. "
        f"Name it with --{what}_column."
    )


def load_cc_sbu_align(folder: str | os.PathLike, skipped: SkippedImages | None = None):
    """
    Reads the original stage-2 layout `folder/filter_cap.json` (`{"annotations": [{"image_id", "caption"}]}`) +
    `folder/image/{image_id}.jpg` into a `datasets.Dataset` of records (`image` = path, `text`, `sample_id`).
    Entries whose image file is missing are skipped, counted and logged.
    """
    import datasets

    folder = Path(folder)
    annotation_file = folder / "filter_cap.json"
    try:
        annotations = json.loads(annotation_file.read_text(encoding="utf-8"))["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{annotation_file} is not a cc_sbu_align annotation file ({error}); it must hold "
            '{"annotations": [{"image_id": "2", "caption": "..."}, ...]}.'
        ) from None
    skipped = skipped if skipped is not None else SkippedImages()
    rows = {"image": [], "text": [], "instruction": [], "conversation": [], "sample_id": []}
    for entry in annotations:
        image_id = str(entry["image_id"])
        path = folder / "image" / f"{image_id}.jpg"
        if not path.is_file():
            skipped.record(image_id, f"image file not found: {path}")
            continue
        rows["image"].append({"bytes": None, "path": str(path.resolve())})
        rows["text"].append(entry["caption"])
        rows["instruction"].append(None)
        rows["conversation"].append(None)
        rows["sample_id"].append(image_id)
    return datasets.Dataset.from_dict(rows, features=_record_features())


def load_image_text_source(path: str, image_column: str | None = None, text_column: str | None = None,
                           skipped: SkippedImages | None = None, instruction_column: str | None = None,
                           conversation_column: str | None = None) -> tuple[Any, dict[str, str | None], str | None]:
    """
    Opens one data source as a `datasets` dataset without decoding its images.

    `path` is a `cc_sbu_align` folder, a folder / glob / `{000..999}` pattern / file of webdataset `.tar` shards
    (`jpg` + `json` with a `caption` field or `txt`), a dataset saved with `save_to_disk`, a data file or folder
    `datasets.load_dataset` reads (json, csv, parquet, imagefolder), or a Hub dataset id. Rows of data files and
    datasets may hold a task instruction (prompting the sample with it) or a multi-turn conversation (LLaVA's
    `conversations`, or chat `messages`) instead of a caption; rows with those need no image (text-only samples).

    Returns:
        `(dataset, columns, base_dir)`: a map-style `datasets.Dataset` or a streaming `datasets.IterableDataset`;
        `columns` = `{"image", "text", "instruction", "conversation", "id"}` column names in it (None: absent);
        `base_dir` = where relative image paths start.
    """
    import datasets

    record_columns = {"image": "image", "text": "text", "instruction": "instruction", "conversation": "conversation",
                      "id": "sample_id"}
    if os.path.isfile(os.path.join(path, "filter_cap.json")):
        return load_cc_sbu_align(path, skipped), record_columns, None

    check_data_path(path)
    shards = find_webdataset_shards(path)
    if shards:
        stream = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        stream = stream.decode(False)
        names = list(stream.features) if stream.features is not None else []
        image_key = _pick_column(names, image_column, WEBDATASET_IMAGE_KEYS, "image", path)
        if text_column is None and "json" not in names and "txt" not in names:
            raise ValueError(f"The shards of {path} have no `json` or `txt` member for the caption; keys: {names}.")

        def to_record(row: dict) -> dict:
            if text_column is not None:
                text = row.get(text_column)
            else:
                text = (row.get("json") or {}).get("caption") or row.get("txt")
            return {"image": row.get(image_key), "text": text, "instruction": None, "conversation": None,
                    "sample_id": f"{row['__url__']}#{row['__key__']}"}

        stream = stream.map(to_record, remove_columns=names, features=_record_features())
        return stream, record_columns, None

    if os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        dataset = datasets.load_from_disk(path)
        base_dir = path
    elif os.path.exists(path):
        suffix = Path(path).suffix.lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
        if os.path.isfile(path) and builder is None:
            raise ValueError(
                f"Cannot read {path}: give a cc_sbu_align folder, webdataset .tar shards, a saved HF dataset or a "
                ".json/.jsonl/.csv/.parquet file."
            )
        dataset = datasets.load_dataset(builder, data_files=path) if builder else datasets.load_dataset(path)
        base_dir = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    else:
        try:
            dataset = datasets.load_dataset(path)
        except Exception as error:
            raise ValueError(
                f"{path!r} is neither a local path nor a loadable dataset ({type(error).__name__}: {error})."
            ) from None
        base_dir = None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path} has the splits {list(dataset)} but no 'train' split.")
        dataset = dataset["train"]
    names = dataset.column_names
    conversation = _pick_column(names, conversation_column, CONVERSATION_COLUMN_CANDIDATES, "conversation", path,
                                required=False)
    instruction = _pick_column(names, instruction_column, INSTRUCTION_COLUMN_CANDIDATES, "instruction", path,
                               required=False)
    columns = {
        "image": _pick_column(names, image_column, IMAGE_COLUMN_CANDIDATES, "image", path,
                              required=not (conversation or instruction)),
        "text": _pick_column(names, text_column, TEXT_COLUMN_CANDIDATES, "text", path, required=not conversation),
        "instruction": instruction,
        "conversation": conversation,
        "id": next((name for name in ID_COLUMN_CANDIDATES if name in names), None),
    }
    if columns["image"] and isinstance(dataset.features.get(columns["image"]), datasets.Image):
        dataset = dataset.cast_column(columns["image"], datasets.Image(decode=False))
    return dataset, columns, base_dir


def build_training_dataset(
    data_paths: Sequence[str],
    formatter: SampleFormatter,
    ratios: Sequence[float] | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    seed: int = 42,
    shuffle_buffer: int = 1000,
    instruction_column: str | None = None,
    conversation_column: str | None = None,
) -> TrainingData:
    """
    The training data over one or more sources (see `load_image_text_source`).

    One map-style source (cc_sbu_align, saved or file datasets) gives an `ImageTextDataset`: the Trainer shuffles it
    per epoch and shards it across processes. Webdataset shards, or several sources, give an endless streaming
    `datasets.IterableDataset` of formatted samples, as the original's resampled shards were: each source repeats
    without end and is shuffled through a `shuffle_buffer`-sample buffer, several sources are interleaved sample by
    sample with probabilities proportional to `ratios` (the original used LAION 115 : CC/SBU 14, drawing the source
    per batch), and images are decoded after the stream is split between processes (so no process runs dry before
    the others). Streams have no length: train them with `--max_steps`.
    """
    import datasets

    if not data_paths:
        raise ValueError("Give at least one --data_path.")
    ratios = list(ratios or [])
    if ratios and len(ratios) != len(data_paths):
        raise ValueError(f"Got {len(data_paths)} --data_path value(s) but {len(ratios)} --data_ratios; give one each.")
    if any(ratio <= 0 for ratio in ratios):
        raise ValueError(f"--data_ratios must be positive, got {ratios}.")
    skipped = SkippedImages()
    sources = [
        load_image_text_source(path, image_column, text_column, skipped, instruction_column, conversation_column)
        for path in data_paths
    ]

    if len(sources) == 1 and not isinstance(sources[0][0], datasets.IterableDataset):
        dataset, columns, base_dir = sources[0]
        dataset = ImageTextDataset(dataset, columns, formatter, seed=seed, base_dir=base_dir, skipped=skipped)
        return TrainingData(dataset, skipped, [dataset])

    streams = []
    for dataset, columns, base_dir in sources:
        if not isinstance(dataset, datasets.IterableDataset):
            dataset = _records_stream(dataset, columns, base_dir)
        streams.append(dataset.repeat(None).shuffle(seed=seed, buffer_size=shuffle_buffer))
    if len(streams) == 1:
        stream = streams[0]
    else:
        weights = ratios or [1.0] * len(streams)
        stream = datasets.interleave_datasets(
            streams, probabilities=[weight / sum(weights) for weight in weights], seed=seed,
        )
    stream_formatter = StreamSampleFormatter(formatter, seed=seed, skipped=skipped)
    samples = stream.map(stream_formatter, remove_columns=["image", "text"]).filter(_is_readable)
    return TrainingData(samples, skipped, [samples])


def _records_stream(dataset, columns: dict[str, str | None], base_dir: str | None):
    """A map-style dataset as a stream of records (image paths made absolute), for mixing with other sources."""

    def to_record(row: dict, index: int) -> dict:
        return row_to_record(row, columns, index, base_dir)

    stream = dataset.to_iterable_dataset(num_shards=min(64, max(1, len(dataset))))
    return stream.map(to_record, with_indices=True, remove_columns=list(dataset.column_names),
                      features=_record_features())


# ----------------------------------------------------------------------------------------------------------------------
# Collator.


@dataclass
class TrainingCollator:
    """
    Batches formatted samples with the processor's `suffix=` path: `input_ids` = [BOS] prompt (image tokens inside)
    target, right padded; `labels` = the target's answer tokens (end symbol included, cut to `max_txt_len` tokens as
    the original did; a conversation's later questions unlabelled), -100 elsewhere; `pixel_values` from the (already
    cropped) images of the samples that have one.
    """

    processor: Any
    max_txt_len: int = 160

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        needed = ("image", "prompt", "target")
        if not samples or any(key not in sample for sample in samples for key in needed):
            keys = sorted(samples[0]) if samples else []
            raise ValueError(
                f"The collator needs the sample fields {needed}, got {keys}. Trainer removed them: set "
                "remove_unused_columns=False (minigpt4-train does)."
            )
        images = [sample["image"] for sample in samples]
        if any(image is None for image in images):  # text-only samples: the images row by row
            images = [[] if image is None else [image] for image in images]
        batch = self.processor(
            images=images,
            text=[sample["prompt"] for sample in samples],
            suffix=[sample["target"] for sample in samples],
            max_txt_len=self.max_txt_len,
            padding="longest",
            padding_side="right",
            return_tensors="pt",
        )
        return dict(batch)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer groups and the original learning-rate schedule.


def decay_parameter_names(model: nn.Module) -> list[str]:
    """
    Trainable parameters that get weight decay, as the original's `get_optimizer_params`: matrices (ndim >= 2);
    biases, norms and other vectors (ndim < 2) get none.
    """
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.ndim >= 2]


@dataclass
class LinearWarmupCosineSchedule:
    """
    The original `linear_warmup_cosine_lr` per iteration `step` (0-based, the rate used for that step's update):
    - `step < warmup_steps`: `min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / warmup_steps)`;
    - afterwards: `min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * step / max_steps))` (the cosine runs over all
      `max_steps`, warmup included, so it does not start at exactly `init_lr`).

    Called with a step it returns the factor on `init_lr` (for `torch.optim.lr_scheduler.LambdaLR`).
    """

    init_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    max_steps: int

    def learning_rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return min(self.init_lr, self.warmup_lr + (self.init_lr - self.warmup_lr) * step / self.warmup_steps)
        return (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(self.max_steps, 1))) + (
            self.min_lr
        )

    def __call__(self, step: int) -> float:
        return self.learning_rate(step) / self.init_lr if self.init_lr else 0.0


class MiniGPT4Trainer(Trainer):
    """
    `Trainer` with the original recipe's optimizer groups (`decay_parameter_names`) and, unless `lr_schedule` is
    `"trainer"`, its `LinearWarmupCosineSchedule` (peak = `--learning_rate`, warmup = `--warmup_steps`).

    Checkpoints hold only the trainable weights (plus optimizer, scheduler, RNG and trainer state), as the original's
    did; the frozen ones come from `--model_name_or_path` again on resume. `save_frozen_weights=True` keeps whole
    models in checkpoints.
    """

    def __init__(self, *args, min_lr: float = 0.0, warmup_lr: float = 0.0, lr_schedule: str = "linear_warmup_cosine",
                 save_frozen_weights: bool = False, **kwargs):
        if lr_schedule not in ("linear_warmup_cosine", "trainer"):
            raise ValueError(f"lr_schedule must be 'linear_warmup_cosine' or 'trainer', got {lr_schedule!r}.")
        super().__init__(*args, **kwargs)
        self.min_lr = min_lr
        self.warmup_lr = warmup_lr
        self.lr_schedule = lr_schedule
        model = self.model
        if not save_frozen_weights and isinstance(model, nn.Module) and hasattr(model, "_keys_to_ignore_on_save"):
            trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            model._keys_to_ignore_on_save = {key for key in model.state_dict() if key not in trainable}

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_schedule == "trainer":
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            schedule = LinearWarmupCosineSchedule(
                init_lr=self.args.learning_rate,
                min_lr=self.min_lr,
                warmup_lr=self.warmup_lr,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                max_steps=num_training_steps,
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler


def epoch_of(state_epoch: float | None) -> int:
    """The integer epoch at an epoch start (`TrainerState.epoch` is a float that can be a hair below the integer)."""
    if state_epoch is None:
        return 0
    nearest = round(state_epoch)
    return nearest if abs(state_epoch - nearest) < 1e-6 else math.floor(state_epoch)


class SetEpochCallback(TrainerCallback):
    """Tells the training data the epoch before each epoch starts (reshuffled streams; new crops and prompts)."""

    def __init__(self, training_data: "TrainingData"):
        self.training_data = training_data

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.training_data.set_epoch(epoch_of(state.epoch))


# ----------------------------------------------------------------------------------------------------------------------
# Model preparation: what trains, the projection warm start, LoRA.

PROJECTION_PREFIX = "language_projection."
ORIGINAL_PROJECTION_PREFIX = "llama_proj."
PROJECTION_FILE_NAME = "language_projection.safetensors"


def load_projection_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads a projection checkpoint as `{"weight", "bias"}`: a safetensors file written by a training run
    (`language_projection.{weight,bias}`, or bare `weight`/`bias`), a Trainer checkpoint's `model.safetensors`
    (`model.language_projection.{weight,bias}`), or the original's `.pth`
    (`{"model": {"llama_proj.weight", "llama_proj.bias", ...}}`, e.g. a stage-1 `checkpoint_*.pth` or
    `pretrained_minigpt4.pth`).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Projection file not found: {path}")
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"Cannot read {path} as a torch checkpoint: {error}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict.")
    # A training run's file, a Trainer checkpoint of the current layout (`model.language_projection.*`), the original's.
    for prefix in (PROJECTION_PREFIX, "model." + PROJECTION_PREFIX, ORIGINAL_PROJECTION_PREFIX, ""):
        weights = {suffix: state.get(prefix + suffix) for suffix in ("weight", "bias")}
        if all(isinstance(value, torch.Tensor) for value in weights.values()):
            return weights
    raise ValueError(
        f"{path} has no projection weights; expected language_projection.weight/bias (a training run's file) or "
        f"llama_proj.weight/bias (the original's). Its keys: {sorted(state)[:12]}"
    )


def init_projection(model: nn.Module, path: str | os.PathLike) -> None:
    """Copies the projection weights of `path` (see `load_projection_weights`) into `model.language_projection`."""
    weights = load_projection_weights(path)
    projection = model.language_projection
    for name, value in weights.items():
        target = getattr(projection, name)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"The projection {name} in {path} has shape {tuple(value.shape)} but this model's is "
                f"{tuple(target.shape)} (Q-Former width -> LM width); the file belongs to another model size."
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
    logger.info("Initialised language_projection from %s", path)


def projection_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`language_projection.{weight,bias}` of a model (unwrapped from PEFT if needed), as contiguous CPU tensors."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    projection = base.language_projection
    if hasattr(projection, "modules_to_save"):  # PEFT's trained copy
        projection = projection.modules_to_save[projection.active_adapter]
    return {PROJECTION_PREFIX + name: value.detach().cpu().contiguous().clone()
            for name, value in projection.state_dict().items()}


def lora_target_module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """
    The full names of the `nn.Linear` layers inside `model.language_model` (the decoder, without the output head)
    whose last name part is in `targets` (`"all-linear"` = every one), so LoRA never touches the ViT, Q-Former,
    projection or head.
    """
    language_model = model.language_model
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    linear = {name: module for name, module in language_model.named_modules() if isinstance(module, nn.Linear)}
    if list(targets) == ["all-linear"]:
        chosen = list(linear)
    else:
        chosen = [name for name in linear if name.rsplit(".", 1)[-1] in set(targets)]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"No language-model Linear layer is named {list(targets)}; its Linear layers: {available}.")
    return [f"{prefix}.{name}" for name in chosen]


def prepare_model_for_training(
    model: nn.Module,
    *,
    unfreeze_qformer: bool = False,
    projection_file: str | os.PathLike | None = None,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> nn.Module:
    """
    Sets what trains: the projection always; the Q-Former and its query tokens with `unfreeze_qformer`; LoRA
    adapters on the language model's `lora_target_modules` when `lora_r > 0` (as MiniGPT-v2 did: r 64, alpha 16,
    dropout 0.05, q_proj/v_proj), the projection (and Q-Former) then trained as PEFT `modules_to_save`.
    Trainable parameters are kept in float32 whatever the model's dtype (mixed precision needs fp32 masters).

    Returns:
        The model, wrapped in a `peft.PeftModel` when LoRA is on.
    """
    # The model decides what gets gradients (and what runs in eval mode); only the Q-Former is switched, for this run.
    model.apply_freezing(freeze_qformer=False if unfreeze_qformer else None)
    if projection_file is not None:
        init_projection(model, projection_file)
    trainable_modules = [model.language_projection] + ([model.qformer] if unfreeze_qformer else [])
    for module in trainable_modules:
        module.float()
    if unfreeze_qformer:
        model.query_tokens.data = model.query_tokens.data.float()

    if lora_r <= 0:
        return model

    from peft import LoraConfig, get_peft_model

    if unfreeze_qformer:
        logger.warning("With LoRA, --unfreeze_qformer trains the Q-Former layers; the query tokens stay frozen "
                       "(PEFT saves modules, not bare parameters).")
    # PEFT freezes every base parameter; the LoRA layers hold trainable ones, so they follow train()/eval() (their
    # dropout is active while training) while the frozen weights around them stay in eval mode (see the config).
    lora_config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_module_names(model, lora_target_modules),
        modules_to_save=["language_projection"] + (["qformer"] if unfreeze_qformer else []),
        bias="none",
    )
    peft_model = get_peft_model(model, lora_config)
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def trainable_parameter_summary(model: nn.Module) -> str:
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return f"{trainable:,} trainable parameters of {total:,} ({100.0 * trainable / max(total, 1):.3f}%)"


# ----------------------------------------------------------------------------------------------------------------------
# Saving the result.


def save_projection_file(projection: dict[str, torch.Tensor], path: str | os.PathLike,
                         metadata: dict[str, str] | None = None) -> None:
    """Writes the projection alone (`language_projection.{weight,bias}`) as safetensors, via a temporary file."""
    with atomic_path(path) as temporary:
        safetensors.torch.save_file(projection, str(temporary), metadata={"format": "pt", **(metadata or {})})


def save_trained_model(model: nn.Module, processor, output_dir: str | os.PathLike, *, merge_lora: bool = False,
                       metadata: dict[str, str] | None = None) -> nn.Module:
    """
    Writes the final result into `output_dir` (next to the Trainer's `checkpoint-*` folders): a complete HF folder
    (safetensors, config with `auto_map`, code files, processor), and `language_projection.safetensors` (the trained
    projection alone). LoRA adapters are merged into the weights with `merge_lora`; otherwise the folder holds the
    base language model and the adapters go to `output_dir/lora_adapter` (load them with `model.load_adapter`).
    Everything is written to a temporary folder first and then moved in (`atomic_path(..., merge=True)`). The config
    is saved as loaded: training switches parts on through `apply_freezing` arguments, never through the config.

    Returns:
        The plain `MiniGPT4ForConditionalGeneration` that was saved (LoRA merged or removed).
    """
    projection = projection_state_dict(model)
    with atomic_path(output_dir, directory=True, merge=True) as staging:
        if hasattr(model, "merge_and_unload"):  # PEFT
            if merge_lora:
                model = model.merge_and_unload()
            else:
                model.save_pretrained(staging / "lora_adapter")
                model = model.unload()
        model._keys_to_ignore_on_save = None
        embedding_dtype = model.get_input_embeddings().weight.dtype
        model.language_projection.to(embedding_dtype)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        save_projection_file(projection, staging / PROJECTION_FILE_NAME, metadata)
    model.apply_freezing()
    return model


__all__ = [
    "ALIGNMENT_PROMPTS",
    "LLAMA2_PROMPT_TEMPLATE",
    "STAGE2_PROMPT_TEMPLATE",
    "STAGE_PRESETS",
    "TRAINING_PRESETS",
    "V2_PROMPT_TEMPLATE",
    "ImageTextDataset",
    "LinearWarmupCosineSchedule",
    "MiniGPT4Trainer",
    "SampleFormatter",
    "SetEpochCallback",
    "SkippedImages",
    "StreamSampleFormatter",
    "TrainingCollator",
    "TrainingData",
    "TrainingImageTransform",
    "build_training_dataset",
    "clean_caption",
    "conversation_turns",
    "expand_prompts",
    "init_projection",
    "load_cc_sbu_align",
    "load_image_text_source",
    "load_projection_weights",
    "prepare_model_for_training",
    "random_resized_crop_box",
    "row_to_record",
    "save_trained_model",
]
