"""
MiniGPT-4 as an lmms-eval model, and an in-process lmms-eval run that keeps lmms-eval's own result files.

lmms-eval's generic `huggingface` model cannot run MiniGPT-4 as the original did: it decodes everything after the
prompt (the `###` turn separator included), knows nothing of MiniGPT-v2's task identifiers, and has no likelihood
path for multiple-choice tasks. `MiniGPT4LmmsModel` takes the "simple" request format (the task's prompt text and
images) and answers through the processor's chat template:

- generation (`generate_until`): left-padded batches, per-row stopping at the end of the assistant turn (the model's
  stop sequences), answers post-processed as the original chat did, then cut at the task's `until` strings;
- likelihood (`loglikelihood`, multiple-choice tasks): the summed log-probability of each continuation;
- MiniGPT-v2 prompts get a task identifier: `[caption]` for captioning tasks, `[vqa]` otherwise (or as chosen);
- every response is appended to a JSON-lines journal before the next batch, so a killed run resumes where it
  stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm

from minigpt4_hf.evaluation import (
    GROUNDING_VARIANTS,
    continuation_log_likelihoods,
    dataset_type_for,
    generation_prompt,
)
from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS
from minigpt4_hf.inference import generate_answers
from minigpt4_hf.inputs import InputError
from processing_minigpt4 import TASK_IDENTIFIERS


# lmms-eval task-name prefixes that are captioning benchmarks (MiniGPT-v2's `[caption]`).
CAPTION_TASK_PREFIXES = ("coco_cap", "nocaps", "flickr30k", "textcaps")


def task_identifier_for(task_name: str, choice: str, variant: str) -> str | None:
    """
    The MiniGPT-v2 task identifier of an lmms-eval task: `choice` (`auto`, `none` or one of `TASK_IDENTIFIERS`);
    `auto` = `caption` for captioning tasks, `vqa` otherwise. Other variants never get one.
    """
    if variant not in GROUNDING_VARIANTS or choice == "none":
        return None
    if choice != "auto":
        return choice
    return "caption" if task_name.startswith(CAPTION_TASK_PREFIXES) else "vqa"


def request_key(kind: str, task: str, split: str, doc_id, *parts) -> str:
    """A stable id of one request (its kind, task, document, prompt and settings), for the journal."""
    text = json.dumps([kind, task, split, doc_id, *parts], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class MiniGPT4LmmsModel(lmms):
    """
    An lmms-eval model around a loaded MiniGPT-4 `(model, processor)`.

    Args:
        model, processor: from `minigpt4_hf.inference`'s loader.
        journal: a `Journal` (keyed by `key`) holding the responses of earlier runs; new ones are appended.
        batch_size: requests per `generate` / forward call.
        max_new_tokens: overrides the tasks' own limits when set (else the task's, else the original chat's 300).
        task_identifier: `auto`, `none` or one of `TASK_IDENTIFIERS` (MiniGPT-v2 only).
    """

    is_simple = True

    def __init__(self, model, processor, journal, batch_size: int = 1, max_new_tokens: int | None = None,
                 task_identifier: str = "auto"):
        super().__init__()
        if task_identifier not in ("auto", "none", *TASK_IDENTIFIERS):
            raise ValueError(f"task_identifier must be auto, none or one of {', '.join(TASK_IDENTIFIERS)}.")
        self.model, self.processor, self.journal = model, processor, journal
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.task_identifier = task_identifier
        self.variant = getattr(model.config, "variant", "vicuna0")

    # -----------------------------------------------------------------------------------------------------------------

    def _images_of(self, doc_to_visual, task: str, split: str, doc_id) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [visual for visual in (visuals or []) if visual is not None]
        if not all(isinstance(visual, Image.Image) for visual in visuals):
            kinds = sorted({type(visual).__name__ for visual in visuals})
            raise InputError(f"lmms-eval task {task} gives {', '.join(kinds)} inputs; MiniGPT-4 takes images only.")
        return [visual.convert("RGB") for visual in visuals]

    def _prompt(self, context: str, num_images: int, task: str) -> str:
        message = {"role": "user",
                   "content": [{"type": "image"}] * num_images + [{"type": "text", "text": context}]}
        identifier = task_identifier_for(task, self.task_identifier, self.variant)
        if identifier:
            message["task"] = identifier
        return generation_prompt(self.processor, message)

    def _generation_kwargs(self, task_kwargs: dict) -> tuple[dict, list[str]]:
        """`generate()` keyword arguments and the `until` strings from a task's generation settings."""
        until = task_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = (self.max_new_tokens or task_kwargs.get("max_new_tokens") or task_kwargs.get("max_gen_toks")
                          or CHAT_GENERATION_DEFAULTS["max_new_tokens"])
        kwargs = {"max_new_tokens": int(max_new_tokens), "num_beams": int(task_kwargs.get("num_beams") or 1)}
        temperature = float(task_kwargs.get("temperature") or 0)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(task_kwargs.get("top_p") or 1.0))
        else:
            kwargs["do_sample"] = False
        return kwargs, until

    def _run_pending(self, requests: list[Instance], keys: list[str], desc: str, answer_batch) -> list:
        """Answers the requests whose key the journal lacks, a batch at a time (each batch journaled whole)."""
        pending = [index for index, key in enumerate(keys) if key not in self.journal.records]
        with tqdm(total=len(requests), initial=len(requests) - len(pending), desc=desc, unit="request") as progress:
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start : start + self.batch_size]
                values = answer_batch([requests[index] for index in batch])
                self.journal.extend({"key": keys[index], "value": value} for index, value in zip(batch, values))
                progress.update(len(batch))
        return [self.journal.records[key]["value"] for key in keys]

    # -----------------------------------------------------------------------------------------------------------------
    # lmms-eval's interface.

    def generate_until(self, requests: list[Instance]) -> list[str]:
        keys = []
        for request in requests:
            context, task_kwargs, _, doc_id, task, split = request.args
            keys.append(request_key("generate_until", task, split, doc_id, context, task_kwargs, self.max_new_tokens,
                                    self.task_identifier))

        def answer_batch(batch: list[Instance]) -> list[str]:
            # One generate() call per group of equal settings.
            answers: dict[int, str] = {}
            groups: dict[str, list[int]] = {}
            for position, request in enumerate(batch):
                groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(position)
            for positions in groups.values():
                kwargs, until = self._generation_kwargs(batch[positions[0]].args[1])
                images, prompts = [], []
                for position in positions:
                    context, _, doc_to_visual, doc_id, task, split = batch[position].args
                    row_images = self._images_of(doc_to_visual, task, split, doc_id)
                    images.append(row_images)
                    prompts.append(self._prompt(context, len(row_images), task))
                for position, text in zip(positions, generate_answers(self.model, self.processor, images, prompts,
                                                                      **kwargs)):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    answers[position] = text
            return [answers[position] for position in range(len(batch))]

        return self._run_pending(requests, keys, "lmms-eval generation", answer_batch)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        keys, continuations = [], []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            # lmms-eval writes the continuation with its leading space; the processor starts every text segment
            # with sentencepiece's word-start marker itself.
            continuations.append(str(continuation).lstrip(" "))
            keys.append(request_key("loglikelihood", task, split, doc_id, context, continuations[-1],
                                    self.task_identifier))

        positions = {id(request): position for position, request in enumerate(requests)}

        def answer_batch(batch: list[Instance]) -> list[list]:
            images, prompts, targets = [], [], []
            for request in batch:
                context, _, doc_to_visual, doc_id, task, split = request.args
                row_images = self._images_of(doc_to_visual, task, split, doc_id)
                images.append(row_images)
                prompts.append(self._prompt(context, len(row_images), task))
                targets.append(continuations[positions[id(request)]])
            return [list(pair) for pair in continuation_log_likelihoods(self.model, self.processor, images, prompts,
                                                                        targets)]

        return [(float(value[0]), bool(value[1]))
                for value in self._run_pending(requests, keys, "lmms-eval likelihood", answer_batch)]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise InputError("multi-round lmms-eval tasks are not supported by MiniGPT-4's lmms-eval model.")


# ---------------------------------------------------------------------------------------------------------------------
# An lmms-eval run.


def lmms_eval_version() -> str:
    return version("lmms_eval")


def quiet_lmms_eval_logs() -> None:
    """lmms-eval logs through loguru at DEBUG level by default: keep its warnings and errors only."""
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def lmms_eval_tasks(names: Sequence[str], include_paths: Sequence[str] = ()) -> tuple[object, list[str]]:
    """
    lmms-eval's task index and the tasks (or groups) `names` resolves to. Tasks defined under `include_paths` (YAML
    files) are looked up there first; lmms-eval's own ~2000 tasks are indexed only when needed (indexing them takes
    a while). An unknown name is a `InputError` suggesting close known names.
    """
    import difflib

    from lmms_eval.tasks import TaskManager

    quiet_lmms_eval_logs()
    if include_paths:
        local = TaskManager("WARNING", include_path=list(include_paths), include_defaults=False, model_name="minigpt4")
        if set(local.match_tasks(list(names))) >= set(names):
            return local, local.match_tasks(list(names))
    manager = TaskManager("WARNING", include_path=list(include_paths) or None, model_name="minigpt4")
    found = manager.match_tasks(list(names))
    missing = [name for name in names if name not in found and "*" not in name]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5)
            hints.append(f"{name} (close: {', '.join(close)})" if close else name)
        raise InputError(
            f"unknown lmms-eval task(s): {'; '.join(hints)}. lmms-eval knows {len(manager.all_tasks)} tasks "
            "(list them with `lmms-eval --tasks list`); a local task is a YAML file under --include-path."
        )
    return manager, found


def work_around_lmms_eval_0_7_3() -> None:
    """
    Two defects of lmms-eval 0.7.3 stop an in-process run before any score:

    - `simple_evaluate` first patches filelock's internal module `filelock._api` (a fix for several ranks loading
      datasets at once), which filelock 4 no longer has, so the import fails. Where that module is missing, the patch
      is marked as applied (lmms-eval's own `_patched` flag); this process is a single rank.
    - `unwrap_generation_output` (lmms_eval/api/instance.py) turns every non-text model output into text, the
      `(log-likelihood, is-greedy)` pairs of likelihood requests included, so that every `multiple_choice` and
      `loglikelihood` task fails while scoring, whatever the model. The evaluator's reference to it is wrapped to
      keep such pairs as they are.
    """
    import importlib.util

    from lmms_eval import evaluator

    if importlib.util.find_spec("filelock._api") is None:
        evaluator._enable_reentrant_filelocks._patched = True
    original = evaluator.unwrap_generation_output
    if getattr(original, "keeps_likelihood_pairs", False):
        return

    def unwrap_generation_output(output):
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], bool):
            return output, None
        return original(output)

    unwrap_generation_output.keeps_likelihood_pairs = True
    evaluator.unwrap_generation_output = unwrap_generation_output


def run_lmms_eval(lm: MiniGPT4LmmsModel, tasks: list[str], manager, output_dir: Path, limit: int | None = None,
                  model_args: str = "") -> dict:
    """
    Runs lmms-eval in this process with `lm` and writes lmms-eval's own result files (aggregated results and
    per-sample logs) under `output_dir / "lmms-eval"` (in a subfolder named after `model_args`' `pretrained=`, as
    lmms-eval does). Returns lmms-eval's results dictionary (samples removed).
    """
    from lmms_eval import evaluator
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    work_around_lmms_eval_0_7_3()
    results_dir = output_dir / "lmms-eval"
    results_dir.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(results_dir))
    started = get_datetime_str()
    # Some tasks write submission files into the working folder: keep them with the results.
    with contextlib.chdir(results_dir):
        results = evaluator.simple_evaluate(
            model=lm, model_args=model_args, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
            evaluation_tracker=tracker, bootstrap_iters=0, batch_size=lm.batch_size, datetime_str=started,
        )
    samples = results.pop("samples", {})
    # lmms-eval records the model object it was given as the run's model source; its files name the model instead.
    tracker.general_config_tracker.model_source = "minigpt4_hf.lmms_eval_model.MiniGPT4LmmsModel"
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=started)
    for task_name in results.get("configs", {}):
        if task_name in samples:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return results


def summary_entries(results: dict) -> dict[str, dict]:
    """`summary.json` entries (one per lmms-eval task) from lmms-eval's results: each numeric metric, stderr dropped."""
    entries = {}
    for task_name, metrics in results.get("results", {}).items():
        config = results.get("configs", {}).get(task_name, {})
        values = {}
        for name, value in metrics.items():
            metric, _, _ = name.partition(",")
            if "_stderr" in metric or metric == "alias" or not isinstance(value, (int, float)):
                continue
            values[metric] = float(value)
        if not values:
            continue
        split = config.get("test_split") or config.get("validation_split") or "test"
        entries[f"lmms-eval/{task_name}/{split}"] = {
            "suite": "lmms-eval",
            "task": task_name,
            "title": task_name,
            "split": split,
            "metrics": values,
            "primary_metric": next(iter(values)),
            "metric_title": next(iter(values)),
            "task_type": "image-text-to-text",
            "dataset_type": dataset_type_for(str(config.get("dataset_path") or ""), task_name),
            "lmms_eval_version": lmms_eval_version(),
        }
    return entries
