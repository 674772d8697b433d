"""
Evaluation of a MiniGPT-4 checkpoint: MiniGPT-v2's benchmark protocol on Hugging Face datasets, and the scores in
the model card.

The protocol follows the original evaluation code (`eval_scripts/eval_vqa.py`, `eval_scripts/eval_ref.py`,
`minigpt4/datasets/datasets/vqa_datasets.py`, `minigpt4/datasets/datasets/coco_caption.py`,
`minigpt4/common/eval_utils.py` of Vision-CAIR/MiniGPT-4 @d94738a): the same instruction per benchmark (with its task
identifier for MiniGPT-v2), greedy decoding with 20 new tokens (`eval_configs/minigptv2_benchmark_evaluation.yaml`),
the same answer clean-up and scoring rules, except where a benchmark defines its own metric (see `TASKS` and
docs/evaluation.md). lmms-eval runs through `minigpt4_hf.lmms_eval_model`.

Flow of one benchmark: `load_benchmark_dataset` -> `check_columns` -> `plan_items` (every question, its instruction
and reference, before the model loads) -> `run_task` (batched generation or answer ranking, one journal record per
item, so a killed run resumes) -> `score_task` -> `write_task_outputs`. Bad input raises `InputError` (one line, the
flag to fix). torch, transformers and datasets are imported only where they are used.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minigpt4_hf.files import atomic_path, write_text_atomically
from minigpt4_hf.inputs import InputError, looks_like_hub_id


# ---------------------------------------------------------------------------------------------------------------------
# The benchmarks of MiniGPT-v2's protocol.

# `max_new_tokens` of every dataset in eval_configs/minigptv2_benchmark_evaluation.yaml @d94738a.
DEFAULT_MAX_NEW_TOKENS = 20
# `batch_size` of the same config (10 for every benchmark but Hateful Memes).
DEFAULT_BATCH_SIZE = 10
# The variant trained with task identifiers (`[vqa] ...`) and to write boxes (`{<x1><y1><x2><y2>}`): MiniGPT-v2.
# Other variants get the bare instruction, and no box benchmark.
GROUNDING_VARIANTS = ("v2",)
# What `eval_ref.py` accepts as a box answer, matched at the start of the answer after removing spaces.
REC_ANSWER_PATTERN = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


@dataclass(frozen=True)
class BenchmarkTask:
    """
    One benchmark of the MiniGPT-v2 protocol.

    Attributes:
        name: the `--tasks` name.
        title: how tables name it.
        identifier: MiniGPT-v2's task identifier (`[vqa]`, `[refer]`, ...) written before the instruction, or None.
        prompt: the instruction, a format string over the task's `columns` (the original's wording).
        columns: the dataset columns the prompt and the scorer read, besides `image` (rename yours with `--column`).
        metric: how `score_record` / `score_task` score it.
        metric_title: the metric as tables name it.
        task_type: the Hub task of the model card's `model-index`.
        dataset_type: the card's `model-index` dataset id when `--data` is not a Hub id: the Hub copy lmms-eval 0.7.3
            reads (`lmms_eval/tasks/*/*.yaml`), the one the original reads for VSR, a plain name for Hateful Memes.
        ranks_choices: answers are chosen among `choices` by likelihood instead of generated.
        needs_grounding: the answer is a box (MiniGPT-v2 only).
    """

    name: str
    title: str
    identifier: str | None
    prompt: str
    columns: tuple[str, ...]
    metric: str
    metric_title: str
    task_type: str
    dataset_type: str
    ranks_choices: bool = False
    needs_grounding: bool = False


_SHORT_ANSWER = "Based on the image, respond to this question with a short answer: {question}"
_REFER = "give me the location of {expression}"

TASKS: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        # RefCOCO/+/g: `RefCOCOEvalData` (coco_caption.py) prompt, `eval_ref.py` scoring.
        BenchmarkTask("refcoco", "RefCOCO", "refer", _REFER, ("expression", "bbox"), "rec_accuracy",
                      "accuracy (IoU > 0.5)", "object-detection", "lmms-lab-encoder/RefCOCO", needs_grounding=True),
        BenchmarkTask("refcoco+", "RefCOCO+", "refer", _REFER, ("expression", "bbox"), "rec_accuracy",
                      "accuracy (IoU > 0.5)", "object-detection", "lmms-lab-encoder/RefCOCOplus", needs_grounding=True),
        BenchmarkTask("refcocog", "RefCOCOg", "refer", _REFER, ("expression", "bbox"), "rec_accuracy",
                      "accuracy (IoU > 0.5)", "object-detection", "lmms-lab-encoder/RefCOCOg", needs_grounding=True),
        # `OKVQAEvalData`; scored with the VQA evaluation (`VQAEval`), as `eval_vqa.py`.
        BenchmarkTask("okvqa", "OK-VQA", "vqa", _SHORT_ANSWER, ("question", "answers"), "vqa_accuracy",
                      "VQA accuracy", "visual-question-answering", "lmms-lab-encoder/OK-VQA"),
        # `GQAEvalData`; `eval_vqa.py`: lower-cased answer == label.
        BenchmarkTask("gqa", "GQA", "vqa", _SHORT_ANSWER, ("question", "answer"), "exact_match",
                      "accuracy (exact match)", "visual-question-answering", "lmms-lab-encoder/GQA"),
        # `VizWizEvalData`; the VizWiz metric is the VQA accuracy (the original script's simpler count is kept too).
        BenchmarkTask(
            "vizwiz", "VizWiz", "vqa",
            "The question is '{question}' Based on the image, answer the question with a single word or phrase. "
            "and reply 'unanswerable' when the provided information is insufficient",
            ("question", "answers"), "vqa_accuracy", "VQA accuracy", "visual-question-answering",
            "lmms-lab-encoder/VizWiz-VQA",
        ),
        # `VSREvalData`: "true" / "false" against the label.
        BenchmarkTask("vsr", "VSR", "vqa", "Based on the image, is this statement true or false? {caption}",
                      ("caption", "label"), "true_false", "accuracy (true/false)", "visual-question-answering",
                      "cambridgeltl/vsr_zeroshot"),
        # `IconQAEvalData` + `MiniGPTBase.multi_select`: the choice with the lowest loss.
        BenchmarkTask("iconvqa", "IconQA", "vqa", _SHORT_ANSWER, ("question", "choices", "answer"),
                      "multiple_choice", "accuracy (multiple choice)", "visual-question-answering",
                      "lmms-lab-encoder/ICON-QA", ranks_choices=True),
        # `HMEvalData` (no task identifier; "writting" is the original's spelling): "yes" -> 1, "no" -> 0.
        BenchmarkTask("hm", "Hateful Memes", None,
                      "This is an image writting '{text}'. Is this image hateful? Answer yes or no. Answer:",
                      ("text", "label"), "yes_no", "accuracy (yes/no)", "image-classification",
                      "hateful_memes"),
        # `EvalCaptionData` (coco_caption.py); scored with pycocoevalcap's CIDEr.
        BenchmarkTask("coco_caption", "COCO Captions", "caption", "please describe this image?", ("captions",),
                      "cider", "CIDEr", "image-to-text", "lmms-lab-encoder/COCO-Caption"),
    )
}


def parse_task_names(text: str) -> list[BenchmarkTask]:
    """`"refcoco,okvqa"` -> the tasks; an unknown name is a `InputError` that lists the known ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError(f"--tasks is empty; known MiniGPT-v2 tasks: {', '.join(TASKS)}.")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise InputError(
            f"unknown task(s) {', '.join(unknown)} for --suite minigpt-v2; known tasks: {', '.join(TASKS)}."
        )
    return [TASKS[name] for name in dict.fromkeys(names)]


def check_variant_supports(tasks: Sequence[BenchmarkTask], variant: str) -> None:
    """Refuses box benchmarks for a variant that was not trained to write boxes (before any data is loaded)."""
    grounding = [task.name for task in tasks if task.needs_grounding]
    if grounding and variant not in GROUNDING_VARIANTS:
        raise InputError(
            f"{', '.join(grounding)} score boxes, which only a grounding-capable variant writes "
            f"({', '.join(GROUNDING_VARIANTS)}: MiniGPT-v2); this model's config says variant {variant!r}. "
            "Evaluate a MiniGPT-v2 checkpoint, or drop those tasks."
        )


def user_turn(task: BenchmarkTask, row: dict, variant: str) -> dict:
    """
    The chat-template user message of one row: the image, then the task's instruction. MiniGPT-v2 gets the task
    identifier as the message's `task` (its template writes `[vqa] ...` as the original prompts did); other variants,
    which never saw identifiers, get the bare instruction.
    """
    message = {"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": task.prompt.format(**row_text_fields(task, row))}]}
    if task.identifier and variant in GROUNDING_VARIANTS:
        message["task"] = task.identifier
    return message


def row_text_fields(task: BenchmarkTask, row: dict) -> dict:
    return {column: row[column] for column in task.columns if column in row}


def instruction_for(task: BenchmarkTask, row: dict, variant: str) -> str:
    """The user text of one row as the prompt shows it (`[vqa] Based on the image, ...` for MiniGPT-v2)."""
    message = user_turn(task, row, variant)
    text = message["content"][-1]["text"]
    return f"[{message['task']}] {text}" if "task" in message else text


# ---------------------------------------------------------------------------------------------------------------------
# Datasets and columns.


def load_benchmark_dataset(source: str, split: str | None = None):
    """
    A `datasets.Dataset` from `source`: a folder written by `save_to_disk`, a folder or file of data
    (JSON lines, JSON, CSV, Parquet, images with `metadata.jsonl`) or a Hub dataset id. When the source has several
    splits, `split` picks one (a missing or unknown split is a `InputError` listing them); a single file is the split
    `split` (default "test").
    """
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
            if builder is None:
                raise InputError(f"--data {source}: a data file must be .jsonl, .json, .csv or .parquet.")
            # One file is one split: call it "test" (datasets would name it "train").
            loaded = datasets.load_dataset(builder, data_files={split or "test": str(path)})
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        elif not looks_like_hub_id(source):
            raise InputError(f"--data {source}: no such folder or file, and not a Hub dataset id (owner/name).")
        else:
            loaded = datasets.load_dataset(source)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, OSError) as error:
        raise InputError(f"--data {source}: could not load a dataset ({type(error).__name__}: {error}).") from None
    if isinstance(loaded, datasets.Dataset):
        return loaded
    splits = list(loaded)
    if split is None:
        if len(splits) == 1:
            return loaded[splits[0]]
        raise InputError(f"--data {source} has the splits {', '.join(splits)}; pick one with --split.")
    if split not in loaded:
        raise InputError(f"--data {source} has no split {split!r}; its splits: {', '.join(splits)}.")
    return loaded[split]


def dataset_type_for(source: str, default: str) -> str:
    """The `model-index` dataset id of a data source: the source when it is a Hub id, else the benchmark's usual id."""
    return source if looks_like_hub_id(source or "") and not Path(source).exists() else default


def parse_column_mapping(items: Iterable[str], tasks: Sequence[BenchmarkTask]) -> dict[str, dict[str, str]]:
    """
    `--column NAME=COLUMN` / `--column TASK.NAME=COLUMN` flags -> `{task: {name: dataset column}}`. NAME is one of
    the names the tasks read (`image`, `id`, and each task's `columns`).
    """
    mapping: dict[str, dict[str, str]] = {task.name: {} for task in tasks}
    for item in items:
        name, equals, column = item.partition("=")
        if not equals or not name or not column:
            raise InputError(f"--column {item!r}: write NAME=COLUMN or TASK.NAME=COLUMN, e.g. --column question=q.")
        scope, _, name = name.rpartition(".") if "." in name and name.split(".")[0] in TASKS else ("", "", name)
        targets = [task for task in tasks if not scope or task.name == scope]
        if scope and not targets:
            raise InputError(f"--column {item!r}: task {scope} is not among --tasks.")
        known = {"image", "id"} | {column_name for task in targets for column_name in task.columns}
        if name not in known:
            raise InputError(
                f"--column {item!r}: {name!r} is not a column these tasks read ({', '.join(sorted(known))})."
            )
        for task in targets:
            if name in ("image", "id") or name in task.columns:
                mapping[task.name][name] = column
    return mapping


def check_columns(task: BenchmarkTask, column_names: Sequence[str], mapping: dict[str, str], source: str) -> None:
    """A dataset without the columns the task reads is a `InputError` naming them and the `--column` flag."""
    needed = row_names(task, mapping)
    missing = [name for name in needed if mapping.get(name, name) not in column_names]
    if missing:
        described = ", ".join(
            f"{name!r}" + (f" (mapped to {mapping[name]!r})" if name in mapping else "") for name in missing
        )
        raise InputError(
            f"--data {source} (task {task.name}) lacks the column(s) {described}; its columns are "
            f"{', '.join(column_names)}. Name yours with --column NAME=COLUMN, e.g. --column {missing[0]}=YOUR_COLUMN."
        )


def row_names(task: BenchmarkTask, mapping: dict[str, str], with_image: bool = True) -> list[str]:
    """The names a task reads from a row: `image` (unless `with_image` is false), its columns, `id` if mapped."""
    return (["image"] if with_image else []) + list(task.columns) + (["id"] if "id" in mapping else [])


def canonical_row(row: dict, task: BenchmarkTask, mapping: dict[str, str], with_image: bool = True) -> dict:
    """The row under the task's own column names (`image`, `id`, `question`, ...)."""
    return {name: row[mapping.get(name, name)] for name in row_names(task, mapping, with_image)}


def open_row_image(value, image_root: str | os.PathLike | None):
    """
    A row's image: a PIL image (`datasets.Image` feature), a `{"bytes", "path"}` dict, encoded bytes, or a path
    (relative paths are read under `image_root`). Returns an RGB PIL image; raises `ValueError` if unreadable.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and image_root is not None and not os.path.isabs(value):
        value = os.path.join(image_root, value)
    if value is None:
        raise ValueError("the image is missing")
    from processing_minigpt4 import load_rgb_image

    return load_rgb_image(value)


# ---------------------------------------------------------------------------------------------------------------------
# Reference values of each layout: answers, labels, boxes, choices, captions.


def answer_list(value) -> list[str]:
    """Human answers as a list of strings: a list of strings, a list of `{"answer": ...}` dicts, or one string."""
    if isinstance(value, str):
        return [value]
    return [item["answer"] if isinstance(item, dict) else str(item) for item in value]


def label_as_bool(value, true_words: tuple[str, ...] = ("true", "yes", "1")) -> bool:
    """A 0/1, bool, or word label ("true"/"false", "yes"/"no") as a bool."""
    if isinstance(value, str):
        return value.strip().lower() in true_words
    return bool(value)


def box_as_corners(value: Sequence[float], box_format: str) -> list[float]:
    """A ground-truth box as `[x1, y1, x2, y2]` pixels, from `xywh` (COCO, RefCOCO) or `xyxy`."""
    x, y, third, fourth = (float(v) for v in value)
    return [x, y, x + third, y + fourth] if box_format == "xywh" else [x, y, third, fourth]


def choice_list(choices) -> list[str]:
    """The choices as a list: a list, or one comma-separated string (lmms-eval's ICON-QA layout)."""
    if isinstance(choices, str):
        return [choice.strip() for choice in choices.split(",")]
    return [str(choice) for choice in choices]


def choice_index(answer, choices) -> int:
    """The right choice as an index: an int index, a digit string, or the choice's text."""
    if isinstance(answer, str) and not answer.strip().isdigit():
        return choice_list(choices).index(answer.strip())
    return int(answer)


def reference_of(task: BenchmarkTask, row: dict, box_format: str) -> dict:
    """What the scorer compares a prediction with, JSON-ready (stored with each prediction)."""
    if task.metric == "rec_accuracy":
        return {"box": box_as_corners(row["bbox"], box_format)}
    if task.metric == "vqa_accuracy":
        return {"answers": answer_list(row["answers"])}
    if task.metric == "exact_match":
        return {"answer": str(row["answer"])}
    if task.metric in ("true_false", "yes_no"):
        return {"label": label_as_bool(row["label"])}
    if task.metric == "multiple_choice":
        return {"answer": choice_index(row["answer"], row["choices"])}
    if task.metric == "cider":
        captions = row["captions"]
        return {"captions": [captions] if isinstance(captions, str) else list(captions)}
    raise ValueError(f"unknown metric {task.metric!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Scoring. Each per-row scorer returns 1.0 / 0.0 (or a VQA soft score) for one prediction record.


def clean_answer(text: str) -> str:
    """The clean-up every original eval script applies: `<unk>` removed, surrounding whitespace stripped."""
    return text.replace("<unk>", "").strip()


@functools.cache
def _vqa_normalizer():
    """The standard VQA answer normalisation (punctuation, digits, articles, contractions), as lmms-eval ships it."""
    try:
        from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    except ImportError:
        raise InputError(
            "OK-VQA / VizWiz scoring uses lmms-eval's VQA answer normalisation: pip install 'minigpt4-hf[eval]' "
            "(see docs/evaluation.md)."
        ) from None
    return EvalAIAnswerProcessor()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """
    The VQA accuracy of one answer: after the standard normalisation of the prediction and the human answers, the
    mean over each human answer left out of min(1, matches among the others / 3). With one human answer: exact match
    after normalisation.
    """
    normalize = _vqa_normalizer()
    predicted = normalize(clean_answer(prediction).lower())
    humans = [normalize(answer) for answer in answers]
    if len(humans) < 2:
        return float(bool(humans) and predicted == humans[0])
    scores = [min(1.0, sum(other == predicted for other in humans[:i] + humans[i + 1:]) / 3)
              for i in range(len(humans))]
    return sum(scores) / len(scores)


def minigptv2_vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """`eval_vqa.py`'s VizWiz score: min(1, answers equal to the prediction (case-insensitive) / 3), unnormalised."""
    predicted = clean_answer(prediction).lower()
    return min(sum(answer.lower() == predicted for answer in answers) / 3.0, 1.0)


def box_iou(box: Sequence[float], other: Sequence[float]) -> float:
    """IoU of two `[x1, y1, x2, y2]` boxes, +1 pixel convention of `computeIoU` (minigpt4/common/eval_utils.py)."""
    x1, y1, x2, y2 = box
    x3, y3, x4, y4 = other
    intersection = max(0.0, min(x2, x4) - max(x1, x3) + 1) * max(0.0, min(y2, y4) - max(y1, y3) + 1)
    union = (x2 - x1 + 1) * (y2 - y1 + 1) + (x4 - x3 + 1) * (y4 - y3 + 1) - intersection
    return intersection / union if union > 0 else 0.0


def rec_box(answer: str, image_size: Sequence[int], processor) -> tuple[float, float, float, float] | None:
    """
    The box a REC answer gives, in pixels of the original image, as `eval_ref.py` reads it: `<unk>` and spaces
    removed, the answer must start with `{<x1><y1><x2><y2>}` (else None: a wrong answer, never an error); the box is
    then read by the processor's grounding parser (grid value / 100 * width or height).
    """
    text = answer.replace("<unk>", "").replace(" ", "").strip()
    if not REC_ANSWER_PATTERN.match(text):
        return None
    parsed = processor.post_process_grounding([text], [tuple(image_size)])[0]
    boxes = [item["box"] for item in parsed if item.get("box") is not None]
    return tuple(float(v) for v in boxes[0]) if boxes else None


def score_record(task: BenchmarkTask, record: dict, processor=None) -> dict:
    """The per-row score fields of one prediction record (`score` in [0, 1], plus what explains it)."""
    if "error" in record:
        return {"score": 0.0}
    prediction, reference = record["prediction"], record["reference"]
    if task.metric == "rec_accuracy":
        box = rec_box(prediction, record["image_size"], processor)
        iou = box_iou(box, reference["box"]) if box is not None else None
        return {"score": float(iou is not None and iou > 0.5), "box": box, "iou": iou}
    if task.metric == "vqa_accuracy":
        scores = {"score": vqa_accuracy(prediction, reference["answers"])}
        if task.name == "vizwiz":
            scores["minigptv2_script_score"] = minigptv2_vizwiz_accuracy(prediction, reference["answers"])
        return scores
    answer = clean_answer(prediction).lower()
    if task.metric == "exact_match":
        return {"score": float(answer == reference["answer"].strip().lower())}
    if task.metric == "true_false":
        return {"score": float(answer == ("true" if reference["label"] else "false"))}
    if task.metric == "yes_no":
        predicted = {"yes": True, "no": False}.get(answer)
        return {"score": float(predicted is not None and predicted == reference["label"])}
    if task.metric == "multiple_choice":
        return {"score": float(record["choice"] == reference["answer"])}
    return {}


def caption_tokens(text: str) -> str:
    """
    The Python caption tokenisation (`--caption-tokenizer simple`): lower case, punctuation removed, words joined by
    single spaces; close to, not identical with, the Stanford PTB tokenizer that COCO's scorer runs in Java.
    """
    words = re.sub(r"[^\w\s'-]", " ", text.lower()).split()
    return " ".join(word.strip("'-") for word in words if word.strip("'-"))


def cider_score(predictions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "ptb") -> float:
    """
    Corpus CIDEr (COCO's CIDEr-D, pycocoevalcap) of predicted captions against reference captions, keyed by row id,
    x 100. `tokenizer="ptb"` tokenises as the COCO caption evaluation does (Stanford PTBTokenizer, needs Java);
    `"simple"` uses `caption_tokens` (no Java; numbers differ slightly).
    """
    from pycocoevalcap.cider.cider import Cider

    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        references = ptb.tokenize({key: [{"caption": c} for c in captions] for key, captions in references.items()})
        predictions = ptb.tokenize({key: [{"caption": clean_answer(text)}] for key, text in predictions.items()})
    else:
        references = {key: [caption_tokens(c) for c in captions] for key, captions in references.items()}
        predictions = {key: [caption_tokens(clean_answer(text))] for key, text in predictions.items()}
    score, _ = Cider().compute_score(references, predictions)
    return float(score) * 100


def check_scorer_available(tasks: Sequence[BenchmarkTask], caption_tokenizer: str = "ptb") -> None:
    """Refuses, before anything is loaded, tasks whose scorer needs a package or Java that is missing."""
    if any(task.metric == "vqa_accuracy" for task in tasks):
        _vqa_normalizer()
    if any(task.metric == "cider" for task in tasks):
        try:
            import pycocoevalcap  # noqa: F401
        except ImportError:
            raise InputError("coco_caption scoring needs pycocoevalcap: pip install 'minigpt4-hf[eval]'.") from None
        if caption_tokenizer == "ptb" and shutil.which("java") is None:
            raise InputError(
                "coco_caption's PTB tokenizer runs in Java, and there is no `java` here: install a JRE (e.g. "
                "apt-get install default-jre-headless) or pass --caption-tokenizer simple (no Java, slightly "
                "different CIDEr)."
            )


def score_task(task: BenchmarkTask, records: list[dict], processor=None, caption_tokenizer: str = "ptb") -> dict:
    """
    Scores a task's prediction records (in dataset order). Returns `{"metrics": {name: percent}, "rows": [per-row
    score fields]}`; each row's fields are added to its record by `write_task_outputs`.
    """
    rows = [score_record(task, record, processor) for record in records]
    metrics: dict[str, float] = {}
    if not records:
        return {"metrics": metrics, "rows": rows}
    if task.metric == "cider":
        readable = [record for record in records if "error" not in record]
        predictions = {record["id"]: record["prediction"] for record in readable}
        references = {record["id"]: record["reference"]["captions"] for record in readable}
        value = cider_score(predictions, references, caption_tokenizer) if readable else 0.0
        # Unreadable images count as a zero-score caption: scale by the share that was scored.
        metrics["cider"] = value * len(readable) / len(records)
    else:
        metrics["accuracy"] = 100 * sum(row["score"] for row in rows) / len(rows)
        if task.name == "vizwiz":
            script_scores = [row.get("minigptv2_script_score", 0.0) for row in rows]
            metrics["accuracy_minigptv2_script"] = 100 * sum(script_scores) / len(rows)
    return {"metrics": metrics, "rows": rows}


# ---------------------------------------------------------------------------------------------------------------------
# Running a model over a benchmark.


def answer_end_text(model, processor) -> str:
    """
    The text that ends an answer: the model's first stop sequence (`###` for MiniGPT-4 v1, `</s>` for MiniGPT-4 with
    Llama-2 and MiniGPT-v2), the original's `end_sym`, appended to each choice when ranking.
    """
    stops = model.config.stop_token_ids
    text = processor.tokenizer.decode(stops[0]).strip() if stops else ""
    return text or (processor.tokenizer.eos_token or "")


def generation_prompt(processor, message: dict) -> str:
    """The chat-template prompt that asks the assistant to answer one user `message`."""
    return processor.apply_chat_template([message], add_generation_prompt=True)


def continuation_log_likelihoods(
    model, processor, images: list[list], prompts: list[str], continuations: list[str]
) -> list[tuple[float, bool]]:
    """
    For each row: the summed log-probability of `continuations[i]` after `prompts[i]` (with `images[i]`), and
    whether greedy decoding would produce exactly it. One right-padded forward pass; the continuation is tokenised
    as its own segment, as the original tokenised answers (`MiniGPTBase.forward`).
    """
    import torch

    from minigpt4_hf.inference import input_device

    inputs = processor(images=images, text=prompts, suffix=continuations, return_tensors="pt")
    labels = inputs.pop("labels").to(input_device(model))
    inputs = inputs.to(input_device(model))
    with torch.inference_mode():
        logits = model(**inputs).logits[:, :-1]  # (rows, length - 1, vocabulary): the prediction of each next token
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = torch.log_softmax(logits[mask].float(), dim=-1)  # (continuation tokens, vocabulary)
        token_log_probs = log_probs.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
        greedy = log_probs.argmax(-1) == targets[mask]
        rows = mask.nonzero()[:, 0]
        return [(float(token_log_probs[rows == row].sum()), bool(greedy[rows == row].all()))
                for row in range(len(prompts))]


def rank_choices(
    model, processor, image, prompt: str, choices: Sequence[str], end_text: str
) -> tuple[int, list[float]]:
    """
    `MiniGPTBase.multi_select`: each choice (+ the answer end) scored by its loss after the prompt; returns the index
    of the most likely choice and each choice's negative log-likelihood (summed over its tokens).
    """
    scored = continuation_log_likelihoods(
        model, processor, [[image]] * len(choices), [prompt] * len(choices),
        [f"{choice}{end_text}" for choice in choices],
    )
    losses = [-log_prob for log_prob, _ in scored]
    return min(range(len(choices)), key=losses.__getitem__), losses


@dataclass
class TaskRun:
    """The settings of one benchmark run (what `run_task` needs besides the model and the data)."""

    task: BenchmarkTask
    split: str
    mapping: dict[str, str] = field(default_factory=dict)
    variant: str = "vicuna0"
    box_format: str = "xywh"
    image_root: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    limit: int | None = None

    @property
    def key(self) -> str:
        """File-name stem of this task and split (`refcoco-val`)."""
        return f"{self.task.name}-{self.split}"


@dataclass(frozen=True)
class Item:
    """
    One question of a benchmark: a dataset row, or one of its referring expressions when a row lists several. Holds
    the row's text fields (no image), the instruction and the reference, all read before any model is loaded.
    """

    row: int
    key: str  # the journal / predictions id: the row's id, plus ":N" for its N-th expression
    fields: dict
    instruction: str
    reference: dict


def row_items(row: dict, index: int, run: TaskRun) -> list[Item]:
    """
    The items of one canonical row (text fields only). A REC row whose `expression` is a list (one object, several
    referring expressions, as lmms-eval's RefCOCO layout) gives one item per expression.
    """
    key = str(row["id"]) if "id" in row else str(index)
    expressions = row.get("expression")
    if run.task.needs_grounding and isinstance(expressions, (list, tuple)):
        parts = [(f"{key}:{part}", {**row, "expression": text}) for part, text in enumerate(expressions)]
    else:
        parts = [(key, row)]
    items = []
    for item_key, fields in parts:
        try:
            reference = reference_of(run.task, fields, run.box_format)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise InputError(
                f"task {run.task.name}, row {index}: cannot read the reference ({type(error).__name__}: {error}); "
                "check what --column maps and the accepted layouts in docs/evaluation.md."
            ) from None
        items.append(Item(index, item_key, fields, instruction_for(run.task, fields, run.variant), reference))
    return items


def plan_items(dataset, run: TaskRun) -> list[Item]:
    """
    Every item of `dataset` (up to `run.limit` rows) in order, read from the text columns only: a reference that
    cannot be read or a repeated id is a `InputError` here, before the model is loaded.
    """
    count = len(dataset) if run.limit is None else min(run.limit, len(dataset))
    columns = [run.mapping.get(name, name) for name in row_names(run.task, run.mapping, with_image=False)]
    items = []
    for index, raw in enumerate(dataset.select_columns(columns).select(range(count))):
        items.extend(row_items(canonical_row(raw, run.task, run.mapping, with_image=False), index, run))
    if len({item.key for item in items}) != len(items):
        raise InputError(f"task {run.task.name}: the id column {run.mapping.get('id')!r} has repeated values.")
    return items


def predict_items(model, processor, dataset, items: list[Item], run: TaskRun) -> list[dict]:
    """Prediction records of some items (one batch): the instruction, the answer (or ranked choice), the reference."""
    image_column = run.mapping.get("image", "image")
    records, images, prompts, readable = [], [], [], []
    for item in items:
        record = {"id": item.key, "row": item.row, "instruction": item.instruction, "reference": item.reference}
        try:
            image = open_row_image(dataset[item.row][image_column], run.image_root)
        except ValueError as error:
            record["error"] = str(error)
        else:
            record["image_size"] = list(image.size)
            images.append(image)
            prompts.append(generation_prompt(processor, user_turn(run.task, item.fields, run.variant)))
            readable.append((record, item))
        records.append(record)
    if not readable:
        return records
    if run.task.ranks_choices:
        end_text = answer_end_text(model, processor)
        for (record, item), image, prompt in zip(readable, images, prompts):
            choices = choice_list(item.fields["choices"])
            chosen, losses = rank_choices(model, processor, image, prompt, choices, end_text)
            record.update(prediction=choices[chosen], choice=chosen, losses=losses)
    else:
        from minigpt4_hf.inference import generate_answers

        answers = generate_answers(
            model, processor, images, prompts, max_new_tokens=run.max_new_tokens, do_sample=False, num_beams=1
        )
        for (record, _), answer in zip(readable, answers):
            record["prediction"] = answer
    return records


def run_task(model, processor, dataset, run: TaskRun, items: list[Item], journal) -> list[dict]:
    """
    Predicts every item (from `plan_items`) that `journal` does not hold yet with the same instruction, a batch at a
    time (each batch appended to the journal whole and synced, so a killed run loses no finished batch), with a
    progress bar. Returns the records of all items, in dataset order.
    """
    import torch
    from tqdm.auto import tqdm

    todo = [item for item in items if journal.records.get(item.key, {}).get("instruction") != item.instruction]
    with tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc=run.key) as progress:
        for start in range(0, len(todo), run.batch_size):
            batch = todo[start : start + run.batch_size]
            try:
                records = predict_items(model, processor, dataset, batch, run)
            except torch.OutOfMemoryError:
                raise InputError(
                    f"out of GPU memory with --batch-size {run.batch_size}: lower it and run the same command again "
                    f"(finished items are kept in {journal.path})."
                ) from None
            journal.extend(records)
            progress.update(len(batch))
    return [journal.records[item.key] for item in items]


# ---------------------------------------------------------------------------------------------------------------------
# Outputs.

SUMMARY_FILE = "summary.json"


def write_task_outputs(output_dir: Path, run: TaskRun, records: list[dict], scores: dict) -> None:
    """`{task}-{split}.predictions.jsonl`: every record in dataset order with its score fields (written atomically)."""
    lines = [json.dumps({**record, **row}, ensure_ascii=False) for record, row in zip(records, scores["rows"])]
    with atomic_path(output_dir / f"{run.key}.predictions.jsonl") as temporary:
        temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_summary(output_dir: Path) -> dict:
    path = output_dir / SUMMARY_FILE
    if not path.exists():
        return {"results": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}); move it away or use another --output-dir.") from None


def update_summary(output_dir: Path, model: str, entries: dict[str, dict]) -> dict:
    """
    Merges results into `summary.json` of `output_dir` (one entry per `suite/task/split`; a rerun replaces its
    entries, others stay) and writes it atomically. Returns the whole summary.
    """
    summary = read_summary(output_dir)
    summary["model"] = model
    summary.setdefault("results", {}).update(entries)
    write_text_atomically(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def summary_entry(run: TaskRun, scores: dict, records: list[dict], dataset_type: str, settings: dict) -> dict:
    """One `summary.json` entry of a MiniGPT-v2-protocol task."""
    return {
        "suite": "minigpt-v2",
        "task": run.task.name,
        "title": run.task.title,
        "split": run.split,
        "metrics": scores["metrics"],
        "primary_metric": run.task.metric if run.task.metric == "cider" else "accuracy",
        "metric_title": run.task.metric_title,
        "task_type": run.task.task_type,
        "dataset_type": dataset_type,
        "items": len(records),
        "unreadable_images": sum("error" in record for record in records),
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The model card: model-index results and a table beside the published figures.


@dataclass(frozen=True)
class PublishedResult:
    """
    A figure published for a released checkpoint, shown beside ours in the card when the benchmark (`dataset_name`
    as the card's `model-index` names it), split and metric match; `measured_scale` puts our value on its scale.
    """

    model: str  # `model_key`: variant and language model size, e.g. "v2-7b"
    dataset_name: str
    split: str
    metric: str
    value: float
    source: str
    measured_scale: float = 1.0


_MINIGPT_V2_PAPER = "MiniGPT-v2 paper (arXiv 2310.09478), REC table"
PUBLISHED_RESULTS: tuple[PublishedResult, ...] = (
    PublishedResult("v2-7b", "RefCOCO", "val", "accuracy", 88.69, _MINIGPT_V2_PAPER),
    PublishedResult("v2-7b", "RefCOCO", "testA", "accuracy", 91.65, _MINIGPT_V2_PAPER),
    PublishedResult("v2-7b", "RefCOCO", "testB", "accuracy", 85.33, _MINIGPT_V2_PAPER),
    PublishedResult("vicuna0-7b", "seedbench", "test", "seed_image", 47.4,
                    "SEED-Bench leaderboard (AILab-CVC/SEED-Bench_Leaderboard), MiniGPT-4 Vicuna-7B, image questions; "
                    "it ranks the options by likelihood (PPL), lmms-eval's seedbench generates the letter",
                    measured_scale=100.0),
)


def model_key(config) -> str:
    """`variant-size` of a config (e.g. `vicuna0-7b`, `v2-7b`) to look its published figures up."""
    variant = getattr(config, "variant", "vicuna0")
    size = {4096: "7b", 5120: "13b"}.get(config.text_config.hidden_size, f"{config.text_config.hidden_size}d")
    return f"{variant}-{size}"


def harness_name(entry: dict) -> str:
    """How a summary entry was measured: `MiniGPT-v2 protocol` or `lmms-eval VERSION`."""
    if entry["suite"] == "minigpt-v2":
        return "MiniGPT-v2 protocol"
    return f"lmms-eval {entry.get('lmms_eval_version', '')}".rstrip()


def eval_results_of(summary: dict) -> list:
    """The summary's scores as huggingface_hub `EvalResult`s (one per metric; the harness in the metric's name)."""
    from huggingface_hub import EvalResult

    results = []
    for entry in summary.get("results", {}).values():
        for metric, value in entry["metrics"].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                continue
            title = entry.get("metric_title") if metric == entry.get("primary_metric") else metric
            results.append(EvalResult(
                task_type=entry["task_type"],
                dataset_type=entry["dataset_type"],
                dataset_name=entry["title"],
                dataset_split=entry["split"],
                metric_type=metric,
                metric_name=f"{title}, {harness_name(entry)}",
                metric_value=round(float(value), 4),
            ))
    return results


def _result_key(result) -> tuple:
    return (result.task_type, result.dataset_type, result.dataset_split, result.dataset_config, result.metric_type)


CARD_SECTION_START = "<!-- minigpt4-evaluate: start (rewritten by minigpt4-evaluate --update-card) -->"
CARD_SECTION_END = "<!-- minigpt4-evaluate: end -->"


def results_table(eval_results: Sequence, key: str) -> str:
    """A Markdown table of the card's results, each beside the published figure for this model, when there is one."""
    published = {(p.dataset_name, p.split, p.metric): p for p in PUBLISHED_RESULTS if p.model == key}
    lines = [
        "| benchmark | split | metric | this checkpoint | published | source of the published figure |",
        "|---|---|---|---|---|---|",
    ]
    for result in sorted(eval_results, key=lambda r: (r.dataset_name, r.dataset_split or "", r.metric_type)):
        reference = published.get((result.dataset_name, result.dataset_split, result.metric_type))
        ours = result.metric_value * (reference.measured_scale if reference else 1.0)
        lines.append(
            f"| {result.dataset_name} | {result.dataset_split or '-'} | {result.metric_name or result.metric_type} | "
            f"{ours:.2f} | {f'{reference.value:.2f}' if reference else '-'} | "
            f"{reference.source if reference else '-'} |"
        )
    return "\n".join(lines)


def card_section(eval_results: Sequence, key: str) -> str:
    """The card's evaluation section (between markers, so that a later run replaces it)."""
    return (
        f"{CARD_SECTION_START}\n## Evaluation\n\n"
        "Measured with `minigpt4-evaluate` (docs/evaluation.md: prompts, decoding, scoring and how they differ from "
        "the papers' setups). Published figures are for the released checkpoint of the same variant and size, with "
        "their source; `-` where none was published.\n\n"
        f"{results_table(eval_results, key)}\n{CARD_SECTION_END}\n"
    )


def update_model_card(card, summary: dict, key: str, model_name: str):
    """
    Writes the summary's scores into `card` (a huggingface_hub `ModelCard`): `model-index` entries (replacing those
    with the same task, dataset, split and metric, keeping the others) and the evaluation section of the text.
    Returns the card.
    """
    new_results = eval_results_of(summary)
    replaced = {_result_key(result) for result in new_results}
    kept = [old for old in (card.data.eval_results or []) if _result_key(old) not in replaced]
    card.data.eval_results = kept + new_results
    if not card.data.model_name:
        card.data.model_name = model_name
    section = card_section(card.data.eval_results, key)
    text = card.text
    if CARD_SECTION_START in text and CARD_SECTION_END in text:
        before, _, rest = text.partition(CARD_SECTION_START)
        _, _, after = rest.partition(CARD_SECTION_END)
        text = before + section.rstrip("\n") + after
    elif "\n## Limitations" in text:
        before, _, after = text.partition("\n## Limitations")
        text = f"{before}\n{section}\n## Limitations{after}"
    else:
        text = f"{text.rstrip()}\n\n{section}"
    card.text = text
    return card


def push_card(card_text: str, repo_id: str, token: str | None = None) -> str:
    """Uploads `card_text` as the Hub repo's README.md; returns the commit URL."""
    from huggingface_hub import HfApi

    info = HfApi(token=token).upload_file(
        path_or_fileobj=card_text.encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="model",
        commit_message="Evaluation results (minigpt4-evaluate)",
    )
    return str(getattr(info, "commit_url", info))


__all__ = [
    "BenchmarkTask",
    "TASKS",
    "TaskRun",
    "PublishedResult",
    "PUBLISHED_RESULTS",
    "answer_end_text",
    "box_iou",
    "caption_tokens",
    "check_columns",
    "check_scorer_available",
    "check_variant_supports",
    "cider_score",
    "continuation_log_likelihoods",
    "instruction_for",
    "load_benchmark_dataset",
    "model_key",
    "parse_column_mapping",
    "parse_task_names",
    "push_card",
    "rank_choices",
    "rec_box",
    "run_task",
    "score_task",
    "update_model_card",
    "update_summary",
    "vqa_accuracy",
    "write_task_outputs",
]
