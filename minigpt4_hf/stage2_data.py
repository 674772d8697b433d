"""
Building MiniGPT-4's stage-2 data (`cc_sbu_align`) from a folder of images, as the paper did (arXiv 2304.10592,
section 3.2).

Steps, each one resumable through its own JSON-lines journal in the work folder:

1. describe: the stage-1 model answers the paper's "Describe this image in detail..." prompt; when the answer has
   fewer than 80 tokens it is asked "Continue" and the two answers are joined (`describe.jsonl`).
2. refine: a chat LLM fixes each description with the paper's prompt, through an OpenAI-compatible endpoint or a
   local transformers causal LM (`refine.jsonl`).
3. filter: the paper's rules drop apologies, "incomplete" replies, short and non-English texts, keep the original
   when the refiner calls it already correct, and remove repeated sentences (`filter.jsonl`).
4. review (optional): a TSV/CSV for a manual pass; its decisions are applied at export.
5. export: `cc_sbu_align/filter_cap.json` + `cc_sbu_align/image/{image_id}.jpg`, an HF `datasets` dataset saved to
   disk (optionally pushed to the Hub) and `summary.json`.

Heavy libraries (torch, transformers, datasets) are imported inside the steps that need them.
"""

import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import http.client
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from minigpt4_hf.files import atomic_path
from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS, generation_kwargs
from minigpt4_hf.inputs import check_model_path
from minigpt4_hf.journal import Journal


logger = logging.getLogger("stage2_data")

# The paper's prompts (arXiv 2304.10592, section 3.2). The processor puts BOS in front; there is no system text.
DESCRIBE_PROMPT = (
    "###Human: <Img><ImageHere></Img> Describe this image in detail. Give as many details as possible. "
    "Say everything you see. ###Assistant: "
)
# Appended right after the first answer (the model ended that answer with "###", which this prompt starts with).
CONTINUE_PROMPT = "###Human: Continue ###Assistant: "
# The paper's ChatGPT post-processing prompt, verbatim; sent as the system message.
FIX_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not English "
    "sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return directly the "
    "results without explanation. Return directly the input paragraph if it is already correct without explanation."
)

STEPS = ("describe", "refine", "filter", "review", "export")
DEFAULT_STEPS = ("describe", "refine", "filter", "export")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# Why an item is left out of the export. Items that are only pending (a failed refinement is retried on the next
# run) are counted separately in the summary.
DROP_REASONS = {
    "unreadable_image": "the image file could not be read",
    "apology": "the refiner apologised or corrected itself instead of returning the paragraph",
    "already_correct_with_repetition": "the refiner said the paragraph is already correct but mentions repetition",
    "incomplete": "the refiner called the paragraph incomplete",
    "refiner_truncated": "the refiner's reply was cut by its token limit",
    "too_short": "fewer than 50 characters",
    "not_english": "the text is not English",
    "review": "dropped in the manual review",
}


# ----------------------------------------------------------------------------------------------------------------
# Journals and the work folder.


def digest(*texts: str) -> str:
    """A short fingerprint of the inputs an item's record was computed from (a changed input redoes the item)."""
    hasher = hashlib.sha256()
    for text in texts:
        hasher.update(text.encode("utf-8"))
        hasher.update(b"\0")
    return hasher.hexdigest()[:16]


class WorkDirLock:
    """An exclusive lock on the work folder, so two runs never write the same journals (released on any exit)."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / ".lock"
        self._handle = None

    def __enter__(self) -> "WorkDirLock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return self
        self._handle = open(self.path, "w")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise ValueError(
                f"Another build is running in {self.path.parent}; wait for it to finish or use another --work-dir."
            ) from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()


# ----------------------------------------------------------------------------------------------------------------
# Images.


def find_images(folder: str | os.PathLike, max_images: int | None = None) -> list[tuple[str, Path]]:
    """
    The images directly inside `folder`, sorted by name, as `(image_id, path)`; the id is the file name without its
    extension (the export writes `image/{image_id}.jpg`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder; give the folder that holds the source images.")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in images:
            raise ValueError(
                f"{images[path.stem].name} and {path.name} would both get the image id {path.stem!r}; rename one."
            )
        images[path.stem] = path.resolve()  # absolute: later steps may run from another folder
    if not images:
        raise ValueError(
            f"No images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files directly in it)."
        )
    found = list(images.items())
    return found[:max_images] if max_images else found


# ----------------------------------------------------------------------------------------------------------------
# Step 1: describe.


@dataclasses.dataclass
class DescribeSettings:
    """How the stage-1 model writes the descriptions (defaults: the original demo's sampling, 300 new tokens)."""

    batch_size: int = 8
    max_new_tokens: int = CHAT_GENERATION_DEFAULTS["max_new_tokens"]
    min_answer_tokens: int = 80  # answers shorter than this get the "Continue" turn (the paper's 80 tokens)
    do_sample: bool = CHAT_GENERATION_DEFAULTS["do_sample"]
    temperature: float = CHAT_GENERATION_DEFAULTS["temperature"]
    top_p: float = CHAT_GENERATION_DEFAULTS["top_p"]
    num_beams: int = CHAT_GENERATION_DEFAULTS["num_beams"]
    repetition_penalty: float = CHAT_GENERATION_DEFAULTS["repetition_penalty"]
    seed: int = 42


def describe_batch(model, processor, images: list, prompts: list[str], settings: DescribeSettings) -> list[str]:
    """One batched `generate` call with the describe settings; returns each row's answer text."""
    from minigpt4_hf.inference import generate_answers

    settings_kwargs = generation_kwargs({
        "max_new_tokens": settings.max_new_tokens,
        "num_beams": settings.num_beams,
        "repetition_penalty": settings.repetition_penalty,
        "do_sample": settings.do_sample,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "pad_token_id": processor.tokenizer.pad_token_id,
    })
    return generate_answers(model, processor, images, prompts, **settings_kwargs)


def describe_images(model, processor, images: list[tuple[str, Path]], journal: Journal,
                    settings: DescribeSettings) -> int:
    """
    Writes a description for every image that has none in `journal` yet; returns how many it described.

    The paper's procedure: the first answer to `DESCRIBE_PROMPT`; if it has fewer than `min_answer_tokens` tokens,
    the conversation goes on with `CONTINUE_PROMPT` and the second answer is appended to the first.
    """
    import torch

    from processing_minigpt4 import load_rgb_image

    pending = [(image_id, path) for image_id, path in images if journal.records.get(image_id, {}).get("status") != "ok"]
    if len(pending) < len(images):
        logger.info("describe: %d of %d images already described; skipping them.", len(images) - len(pending),
                    len(images))
    torch.manual_seed(settings.seed)
    tokenizer = processor.tokenizer
    done = 0
    progress = tqdm(total=len(pending), desc="describe", unit="image")
    for start in range(0, len(pending), settings.batch_size):
        batch = []
        for image_id, path in pending[start : start + settings.batch_size]:
            try:
                batch.append((image_id, path, load_rgb_image(path)))
            except ValueError as error:
                journal.append({"image_id": image_id, "image": str(path), "status": "error", "error": str(error)})
                progress.update(1)
        if not batch:
            continue
        pil_images = [image for _, _, image in batch]
        first = describe_batch(model, processor, pil_images, [DESCRIBE_PROMPT] * len(batch), settings)
        first_lengths = [len(ids) for ids in tokenizer(first, add_special_tokens=False)["input_ids"]]
        short = [row for row, length in enumerate(first_lengths) if length < settings.min_answer_tokens]
        continuations: dict[int, str] = {}
        if short:
            prompts = [DESCRIBE_PROMPT + first[row] + CONTINUE_PROMPT for row in short]
            answers = describe_batch(model, processor, [pil_images[row] for row in short], prompts, settings)
            continuations = dict(zip(short, answers))
        for row, (image_id, path, _) in enumerate(batch):
            continuation = continuations.get(row)
            description = " ".join(part for part in (first[row], continuation) if part).strip()
            journal.append({
                "image_id": image_id,
                "image": str(path),
                "status": "ok",
                "first_answer": first[row],
                "first_answer_tokens": first_lengths[row],
                "continuation": continuation,
                "description": description,
            })
            done += 1
        progress.update(len(batch))
    progress.close()
    return done


# ----------------------------------------------------------------------------------------------------------------
# Step 2: refine.


@dataclasses.dataclass
class RefineResult:
    text: str
    finish_reason: str | None
    attempts: int = 1


class RefineFailure(Exception):
    """One item could not be refined (recorded as failed; the next run tries it again)."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class RefinerSetupError(RuntimeError):
    """The endpoint refuses every request (wrong key, URL or model): the run stops instead of failing every item."""


def chat_completions_url(url: str) -> str:
    """`--refiner-url` may be a base URL (`https://api.openai.com/v1`) or the full `/chat/completions` URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class OpenAIChatRefiner:
    """
    Refines paragraphs through an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).

    Retries 429s, 5xx replies, connection errors and timeouts up to `max_retries` times with exponential backoff
    (`backoff * 2**k` seconds, at most `max_backoff`, or the server's `Retry-After` when it sends one). A reply that is
    not the expected JSON fails the item at once. The API key is sent as a bearer token and kept out of every record
    and message.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, temperature: float = 0.7,
                 max_tokens: int = 1024):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--refiner-url must be an http(s) URL, got {url!r}.")
        self.url = chat_completions_url(url)
        self.model = model
        self._api_key = (api_key or "").strip() or None  # a stray newline from a key file would break the header
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _request_body(self, paragraph: str) -> bytes:
        return json.dumps({
            "model": self.model,
            "messages": [{"role": "system", "content": FIX_PROMPT}, {"role": "user", "content": paragraph}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode("utf-8")

    def refine(self, paragraph: str) -> RefineResult:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        body = self._request_body(paragraph)
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                try:
                    detail = self._redact(error.read()[:300].decode("utf-8", "replace"))
                except (OSError, http.client.HTTPException):
                    detail = "(no readable body)"
                if error.code in (401, 403):
                    raise RefinerSetupError(
                        f"The refiner endpoint {self.url} refused the request (HTTP {error.code}: {detail}). Check the "
                        "API key (--api-key-env names the variable that holds it)."
                    ) from None
                if error.code == 404:
                    raise RefinerSetupError(
                        f"HTTP 404 from {self.url} ({detail}). Check --refiner-url (an OpenAI-compatible base URL such "
                        f"as https://api.openai.com/v1) and --refiner-model ({self.model!r})."
                    ) from None
                problem = f"HTTP {error.code}: {detail}"
                if error.code != 429 and error.code < 500:
                    raise RefineFailure(problem, attempt) from None
                retry_after = _seconds(error.headers.get("Retry-After") if error.headers else None)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    socket.timeout) as error:
                reason = getattr(error, "reason", error)
                problem = self._redact(f"{type(reason).__name__}: {reason}")
            else:
                return self._parse(raw, attempt)
            if attempt > self.max_retries:
                raise RefineFailure(f"gave up after {attempt} attempts; last error: {problem}", attempt)
            wait = retry_after if retry_after is not None else self.backoff * 2 ** (attempt - 1)
            wait = min(self.max_backoff, wait) * random.uniform(1.0, 1.1)
            logger.debug("refine: attempt %d failed (%s); retrying in %.2f s", attempt, problem, wait)
            time.sleep(wait)

    def _parse(self, raw: bytes, attempt: int) -> RefineResult:
        try:
            reply = json.loads(raw.decode("utf-8"))
            choice = reply["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            snippet = self._redact(raw[:200].decode("utf-8", "replace"))
            raise RefineFailure(f"malformed reply ({type(error).__name__}: {error}): {snippet!r}", attempt) from None
        return RefineResult(text=text.strip(), finish_reason=choice.get("finish_reason"), attempts=attempt)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class LocalLMRefiner:
    """
    Refines paragraphs with a local transformers causal LM, in batches (left padding).

    The prompt is the tokenizer's chat template with the fix prompt as the system message and the paragraph as the
    user message; a template that rejects a system message gets both in the user message; a tokenizer without a
    template gets "FIX_PROMPT\\n\\nPARAGRAPH\\n\\n". Sampling at `temperature` (0 = greedy).
    """

    def __init__(self, path: str, device: str | None = None, dtype: str = "auto", max_new_tokens: int = 1024,
                 temperature: float = 0.7, top_p: float = 1.0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from minigpt4_hf.inference import resolve_device, resolve_dtype

        resolved_device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, resolved_device))
            self.model = self.model.to(resolved_device).eval()
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not load a causal LM and tokenizer from --refiner-local {path}: {error}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p

    def prompt_for(self, paragraph: str) -> tuple[str, bool]:
        """The prompt text, and whether it already holds the special tokens (a rendered chat template does)."""
        if not self.tokenizer.chat_template:
            return f"{FIX_PROMPT}\n\n{paragraph}\n\n", False
        from jinja2.exceptions import TemplateError

        messages = [{"role": "system", "content": FIX_PROMPT}, {"role": "user", "content": paragraph}]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # e.g. templates that take no system message
            messages = [{"role": "user", "content": f"{FIX_PROMPT}\n\n{paragraph}"}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True

    def refine_batch(self, paragraphs: list[str]) -> list[RefineResult]:
        import torch

        prompts = [self.prompt_for(paragraph) for paragraph in paragraphs]
        has_special_tokens = prompts[0][1]
        inputs = self.tokenizer(
            [text for text, _ in prompts], add_special_tokens=not has_special_tokens, padding=True,
            padding_side="left", return_tensors="pt",
        ).to(self.model.device)
        options = generation_kwargs({"max_new_tokens": self.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                                     "do_sample": self.temperature > 0, "temperature": self.temperature,
                                     "top_p": self.top_p})
        with torch.inference_mode():
            generated = self.model.generate(**inputs, **options)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
        results = []
        for row in new_tokens.tolist():
            ended = any(token in eos_ids for token in row)
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append(RefineResult(text=text, finish_reason="stop" if ended else "length"))
        return results


def refine_descriptions(refiner, describe_journal: Journal, journal: Journal, concurrency: int = 4,
                        batch_size: int = 4) -> Counter:
    """
    Refines every description that has no successful refinement of its current text yet; returns counts
    (`ok`, `failed`). The HTTP refiner runs `concurrency` requests at once; the local one runs batches.
    """
    pending = []
    for image_id, described in describe_journal.records.items():
        if described.get("status") != "ok":
            continue
        source = digest(described["description"])
        previous = journal.records.get(image_id)
        if previous and previous.get("status") == "ok" and previous.get("source_digest") == source:
            continue
        pending.append((image_id, described["description"], source))
    finished = sum(1 for record in journal.records.values() if record.get("status") == "ok")
    if finished:
        logger.info("refine: %d item(s) already refined; %d to do.", finished, len(pending))

    counts: Counter = Counter()

    def record_outcome(image_id: str, source: str, outcome: RefineResult | RefineFailure) -> None:
        if isinstance(outcome, RefineFailure):
            journal.append({"image_id": image_id, "status": "failed", "error": str(outcome),
                            "attempts": outcome.attempts, "source_digest": source})
            counts["failed"] += 1
            logger.warning("refine: %s failed: %s", image_id, outcome)
        else:
            journal.append({"image_id": image_id, "status": "ok", "reply": outcome.text,
                            "finish_reason": outcome.finish_reason, "attempts": outcome.attempts,
                            "source_digest": source})
            counts["ok"] += 1

    progress = tqdm(total=len(pending), desc="refine", unit="item")
    if isinstance(refiner, LocalLMRefiner):
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            for (image_id, _, source), result in zip(batch, refiner.refine_batch([text for _, text, _ in batch])):
                record_outcome(image_id, source, result)
            progress.update(len(batch))
    else:
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="refine")
        try:
            futures = {pool.submit(refiner.refine, text): (image_id, source) for image_id, text, source in pending}
            for future in as_completed(futures):
                image_id, source = futures[future]
                try:
                    outcome = future.result()
                except RefineFailure as failure:
                    outcome = failure
                record_outcome(image_id, source, outcome)
                progress.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    progress.close()
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Step 3: filter.

# Frequent ChatGPT failure replies (the paper's hard-coded rules): apologies and self-corrections.
APOLOGY_PATTERN = re.compile(
    r"\bi'?m sorry\b|\bi am sorry\b|\bsorry,? but\b|\bi apologi[sz]e\b|\bmy apologies\b|\bapologies for\b"
    r"|\bi made a mistake\b|\bmy mistake\b|\bi was mistaken\b|\bas an ai\b"
)
# Frequent English words; English text has many of them, other languages written in Latin letters few.
COMMON_ENGLISH_WORDS = frozenset(
    "a an the and or but of in on at to with without from by for as into onto over under near behind beside between "
    "above below next front back left right top bottom side is are was were be been being it its it's this that "
    "these those there here he she they them his her their him we you i image picture photo scene shows appears "
    "seems can be has have had not no some many several other each all one two three also while which who whose "
    "what where when very large small white black red blue green yellow brown man woman people person standing "
    "sitting wearing holding looking background foreground around up down out off".split()
)
SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")


def looks_english(text: str, min_latin_share: float = 0.97, min_common_share: float = 0.2) -> bool:
    """
    A small language check: at least `min_latin_share` of the letters are ASCII and at least `min_common_share` of
    the words are frequent English words.
    """
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return False
    if sum(char.isascii() for char in letters) / len(letters) < min_latin_share:
        return False
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())
    return bool(words) and sum(word in COMMON_ENGLISH_WORDS for word in words) / len(words) >= min_common_share


def remove_repeated_sentences(text: str) -> tuple[str, int]:
    """Drops every sentence whose words (case and punctuation aside) already appeared; returns (text, count)."""
    parts = SENTENCE_END.split(text.strip())
    sentences, separators = parts[0::2], parts[1::2] + [""]
    seen: set[str] = set()
    kept: list[str] = []
    removed = 0
    for sentence, separator in zip(sentences, separators):
        key = " ".join(re.findall(r"\w+", sentence.lower()))
        if key and key in seen:
            removed += 1
            continue
        seen.add(key)
        kept.append(sentence + separator)
    return "".join(kept).strip(), removed


@dataclasses.dataclass
class FilterDecision:
    keep: bool
    reason: str | None
    text: str
    sentences_removed: int = 0


def filter_refined(description: str, reply: str, finish_reason: str | None = None,
                   min_characters: int = 50) -> FilterDecision:
    """
    The paper's rules on one refined paragraph, in this order: an apology or self-correction drops it; "incomplete"
    drops it; "already correct" keeps the original description, unless the reply also mentions "repetition" (dropped);
    a reply cut by the refiner's token limit is dropped; repeated sentences are removed; under `min_characters`
    characters or not English, it is dropped.
    """
    lowered = reply.replace("\u2019", "'").lower()
    if APOLOGY_PATTERN.search(lowered):
        return FilterDecision(False, "apology", reply)
    if "incomplete" in lowered:
        return FilterDecision(False, "incomplete", reply)
    if "already correct" in lowered:
        if "repetition" in lowered:
            return FilterDecision(False, "already_correct_with_repetition", reply)
        text = description
    elif finish_reason == "length":
        return FilterDecision(False, "refiner_truncated", reply)
    else:
        text = reply
    text, removed = remove_repeated_sentences(text)
    if len(text) < min_characters:
        return FilterDecision(False, "too_short", text, removed)
    if not looks_english(text):
        return FilterDecision(False, "not_english", text, removed)
    return FilterDecision(True, None, text, removed)


def filter_items(describe_journal: Journal, refine_journal: Journal, journal: Journal,
                 min_characters: int = 50) -> Counter:
    """Applies `filter_refined` to every successfully refined item not yet filtered; returns kept/dropped counts."""
    counts: Counter = Counter()
    for image_id, refined in refine_journal.records.items():
        described = describe_journal.records.get(image_id)
        if refined.get("status") != "ok" or not described or described.get("status") != "ok":
            continue
        source = digest(described["description"], refined["reply"], str(min_characters))
        if journal.records.get(image_id, {}).get("source_digest") == source:
            continue
        decision = filter_refined(described["description"], refined["reply"], refined.get("finish_reason"),
                                  min_characters)
        journal.append({"image_id": image_id, "keep": decision.keep, "reason": decision.reason, "text": decision.text,
                        "sentences_removed": decision.sentences_removed, "source_digest": source})
        counts["kept" if decision.keep else decision.reason] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Step 4: review.

REVIEW_COLUMNS = ("image_id", "keep", "reason", "image", "text")
KEEP_VALUES = {"1": True, "yes": True, "y": True, "true": True, "keep": True,
               "0": False, "no": False, "n": False, "false": False, "drop": False}


def _delimiter_for(path: Path) -> str:
    return "," if path.suffix.lower() == ".csv" else "\t"


def write_review_file(path: Path, describe_journal: Journal, filter_journal: Journal) -> int:
    """
    Writes every filtered item for a manual pass: `image_id, keep, reason, image, text` (tab-separated, or
    comma-separated for a `.csv` name). `keep` starts as the filter's decision; a reviewer flips it (1/0) and may edit
    `text`. Returns the number of rows.
    """
    rows = 0
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=_delimiter_for(path))
        writer.writerow(REVIEW_COLUMNS)
        for image_id, decision in filter_journal.records.items():
            image = describe_journal.records.get(image_id, {}).get("image", "")
            writer.writerow([image_id, int(decision["keep"]), decision["reason"] or "", image, decision["text"]])
            rows += 1
    return rows


@dataclasses.dataclass
class ReviewDecision:
    keep: bool
    text: str | None


def read_review_decisions(path: str | os.PathLike) -> dict[str, ReviewDecision]:
    """Reads a review file written by `write_review_file` (edited by hand): `{image_id: ReviewDecision}`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--review-decisions {path} does not exist; write one with --steps review first.")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=_delimiter_for(path))
        missing = {"image_id", "keep"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path} has no {' / '.join(sorted(missing))} column; it needs the columns written by --steps review "
                f"({', '.join(REVIEW_COLUMNS)}), {'comma' if path.suffix.lower() == '.csv' else 'tab'}-separated."
            )
        decisions = {}
        for number, row in enumerate(reader, start=2):
            value = (row["keep"] or "").strip().lower()
            if value not in KEEP_VALUES:
                raise ValueError(f"{path}, line {number}: keep is {row['keep']!r}; write 1 (keep) or 0 (drop).")
            text = row.get("text")
            text = text.strip() if text is not None else None
            if KEEP_VALUES[value] and text is not None and not text:
                raise ValueError(f"{path}, line {number}: the item is kept but its text is empty.")
            decisions[row["image_id"]] = ReviewDecision(KEEP_VALUES[value], text)
    return decisions


# ----------------------------------------------------------------------------------------------------------------
# Step 5: export.


def final_items(describe_journal: Journal, refine_journal: Journal, filter_journal: Journal,
                decisions: dict[str, ReviewDecision] | None = None,
                image_ids: list[str] | None = None) -> tuple[list[tuple[str, Path, str]], dict]:
    """
    What the export holds, `[(image_id, image_path, caption)]`, and the summary counts: items in, dropped per reason,
    pending (not finished: retried by the next run), out.
    """
    if decisions:
        unknown = sorted(set(decisions) - set(filter_journal.records))
        if unknown:
            raise ValueError(
                f"The review decisions name {len(unknown)} item(s) this work folder has not filtered, e.g. "
                f"{unknown[:3]}; use the review file written from this --work-dir."
            )
    ids = list(dict.fromkeys((image_ids or []) + list(describe_journal.records)))
    dropped: Counter = Counter()
    pending: Counter = Counter()
    kept = []
    sentences_removed = edited = restored = 0
    for image_id in ids:
        described = describe_journal.records.get(image_id)
        refined = refine_journal.records.get(image_id)
        filtered = filter_journal.records.get(image_id)
        if described is None:
            pending["not_described"] += 1
        elif described.get("status") != "ok":
            dropped["unreadable_image"] += 1
        elif refined is None:
            pending["not_refined"] += 1
        elif refined.get("status") != "ok":
            pending["refine_failed"] += 1
        elif filtered is None:
            pending["not_filtered"] += 1
        else:
            keep, text = filtered["keep"], filtered["text"]
            review = (decisions or {}).get(image_id)
            if review is not None:
                if keep and not review.keep:
                    dropped["review"] += 1
                elif review.keep and not keep:
                    restored += 1
                if review.keep and review.text is not None and review.text != text.strip():
                    edited += 1
                    text = review.text
                keep = review.keep
            if not keep:
                if not filtered["keep"]:
                    dropped[filtered["reason"]] += 1
                continue
            sentences_removed += filtered.get("sentences_removed", 0)
            kept.append((image_id, Path(described["image"]), text))
    summary = {
        "items_in": len(ids),
        "dropped": dict(sorted(dropped.items())),
        "dropped_total": sum(dropped.values()),
        "pending": dict(sorted(pending.items())),
        "pending_total": sum(pending.values()),
        "items_out": len(kept),
        "repeated_sentences_removed": sentences_removed,
        "review_applied": decisions is not None,
        "review_texts_edited": edited,
        "review_restored": restored,
    }
    return kept, summary


def _write_jpeg(source: Path, target: Path) -> None:
    """Copies a JPEG as is; converts anything else to RGB JPEG (quality 95)."""
    from PIL import Image

    from processing_minigpt4 import load_rgb_image

    with Image.open(source) as opened:
        is_jpeg = opened.format == "JPEG"
    if is_jpeg:
        shutil.copyfile(source, target)
    else:
        load_rgb_image(source).save(target, format="JPEG", quality=95)


def export_dataset(items: list[tuple[str, Path, str]], summary: dict, output_dir: str | os.PathLike,
                   push_to_hub: str | None = None, private: bool = False) -> dict:
    """
    Writes `output_dir/cc_sbu_align/` (`filter_cap.json` + `image/{image_id}.jpg`, the original layout),
    `output_dir/hf_dataset/` (`datasets.load_from_disk`; columns `image_id`, `image`, `caption`) and
    `output_dir/summary.json`. Everything is built in a temporary folder and then moved into place (other entries of
    `output_dir` stay), so an interrupted export leaves the previous one whole. Returns the summary.
    """
    if not items:
        raise ValueError(
            "Nothing to export: no item is both finished and kept (see the counts above). Run the earlier steps "
            "first, or look at the drop reasons in the work folder's filter.jsonl."
        )
    output_dir = Path(output_dir)
    with atomic_path(output_dir, directory=True, merge=True) as staging:
        _write_export(items, summary, staging)

    if push_to_hub:
        push_dataset_to_hub(output_dir, push_to_hub, private=private)
    return summary


def _write_export(items: list[tuple[str, Path, str]], summary: dict, staging: Path) -> None:
    """Writes the three export parts (and nothing else) into `staging`."""
    import datasets

    align_dir = staging / "cc_sbu_align"
    (align_dir / "image").mkdir(parents=True)
    annotations = []
    for image_id, image_path, caption in tqdm(items, desc="export", unit="image"):
        try:
            _write_jpeg(image_path, align_dir / "image" / f"{image_id}.jpg")
        except OSError as error:
            raise ValueError(
                f"Cannot read the image of item {image_id!r} ({image_path}): {error}. Was it moved since the describe "
                "step? Put it back, or drop the item with a review file."
            ) from None
        annotations.append({"image_id": image_id, "caption": caption})
    (align_dir / "filter_cap.json").write_text(
        json.dumps({"annotations": annotations}, ensure_ascii=False, indent=1), encoding="utf-8"
    )

    features = datasets.Features(
        {"image_id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string")}
    )

    def rows():
        for annotation in annotations:
            name = f"{annotation['image_id']}.jpg"
            yield {"image_id": annotation["image_id"], "caption": annotation["caption"],
                   "image": {"bytes": (align_dir / "image" / name).read_bytes(), "path": name}}

    dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(staging / "cache"))
    dataset.save_to_disk(str(staging / "hf_dataset"))
    del dataset
    shutil.rmtree(staging / "cache", ignore_errors=True)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def push_dataset_to_hub(output_dir: Path, repo_id: str, private: bool = False) -> None:
    """Uploads the saved dataset (as the Hub's parquet dataset) and `summary.json` to a Hub dataset repo."""
    import datasets
    from huggingface_hub import HfApi

    dataset = datasets.load_from_disk(str(output_dir / "hf_dataset"))
    dataset.push_to_hub(repo_id, private=private,
                        commit_message="MiniGPT-4 stage-2 data built by minigpt4-build-stage2-data")
    HfApi().upload_file(path_or_fileobj=str(output_dir / "summary.json"), path_in_repo="build_summary.json",
                        repo_id=repo_id, repo_type="dataset")
    logger.info("Pushed %d rows to https://huggingface.co/datasets/%s", len(dataset), repo_id)


def format_summary(summary: dict) -> str:
    lines = [f"items in: {summary['items_in']}"]
    for reason, count in summary["dropped"].items():
        lines.append(f"  dropped ({reason}: {DROP_REASONS.get(reason, reason)}): {count}")
    for reason, count in summary["pending"].items():
        lines.append(f"  pending ({reason}; a rerun continues them): {count}")
    lines.append(f"items out: {summary['items_out']} (repeated sentences removed: "
                 f"{summary['repeated_sentences_removed']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The whole run.


@dataclasses.dataclass
class BuildConfig:
    """Everything one run needs (the command-line flags of minigpt4-build-stage2-data)."""

    work_dir: str
    steps: tuple[str, ...] = DEFAULT_STEPS
    images: str | None = None
    max_images: int | None = None
    output_dir: str | None = None
    # describe
    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    device_map: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    describe: DescribeSettings = dataclasses.field(default_factory=DescribeSettings)
    # refine
    refiner_url: str | None = None
    refiner_model: str | None = None
    refiner_local: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    refiner_temperature: float = 0.7
    refiner_max_tokens: int = 1024
    timeout: float = 120.0
    max_retries: int = 5
    retry_backoff: float = 1.0
    max_backoff: float = 60.0
    concurrency: int = 4
    refiner_batch_size: int = 4
    # filter / review / export
    min_characters: int = 50
    review_file: str | None = None
    review_decisions: str | None = None
    push_to_hub: str | None = None
    private: bool = False


def parse_steps(text: str) -> tuple[str, ...]:
    """`"describe,refine"` -> the steps in pipeline order; `"all"` = every step but review."""
    if text.strip() == "all":
        return DEFAULT_STEPS
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise ValueError(f"--steps takes a comma-separated list of {', '.join(STEPS)} (or 'all'); got {text!r}.")
    return tuple(step for step in STEPS if step in names)


def check_config(config: BuildConfig) -> None:
    """Fails early, before any model loads, on flags the chosen steps need."""
    steps = set(config.steps)
    if "describe" in steps and not (config.images and config.model):
        raise ValueError("The describe step needs --images DIR and --model PATH (the stage-1 model).")
    if "describe" in steps:
        check_model_path(config.model)
    if "refine" in steps:
        if bool(config.refiner_local) == bool(config.refiner_url):
            raise ValueError("The refine step needs either --refiner-url URL (with --refiner-model) or "
                             "--refiner-local PATH, not both.")
        if config.refiner_url and not config.refiner_model:
            raise ValueError("--refiner-url needs --refiner-model NAME (e.g. gpt-3.5-turbo, as the paper used).")
    if "export" in steps and not config.output_dir:
        raise ValueError("The export step needs --output-dir DIR.")
    if config.review_decisions and "export" not in steps:
        raise ValueError("--review-decisions is applied by the export step; add export to --steps.")
    if config.describe.batch_size < 1 or config.concurrency < 1 or config.refiner_batch_size < 1:
        raise ValueError("--batch-size, --concurrency and --refiner-batch-size must be at least 1.")


def make_refiner(config: BuildConfig):
    if config.refiner_local:
        return LocalLMRefiner(config.refiner_local, device=config.device, dtype=config.dtype,
                              max_new_tokens=config.refiner_max_tokens, temperature=config.refiner_temperature)
    api_key = os.environ.get(config.api_key_env)
    if not api_key:
        logger.warning("No API key in $%s; sending requests without one (fine for a local server).",
                       config.api_key_env)
    return OpenAIChatRefiner(config.refiner_url, config.refiner_model, api_key=api_key, timeout=config.timeout,
                             max_retries=config.max_retries, backoff=config.retry_backoff,
                             max_backoff=config.max_backoff, temperature=config.refiner_temperature,
                             max_tokens=config.refiner_max_tokens)


def run(config: BuildConfig) -> dict | None:
    """Runs the configured steps in order; returns the export summary when export ran."""
    check_config(config)
    decisions = read_review_decisions(config.review_decisions) if config.review_decisions else None
    images = find_images(config.images, config.max_images) if config.images else None
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    summary = None
    with WorkDirLock(work_dir), Journal(work_dir / "describe.jsonl") as described, \
            Journal(work_dir / "refine.jsonl") as refined, Journal(work_dir / "filter.jsonl") as filtered:
        if "describe" in config.steps:
            from minigpt4_hf.inference import load_model_and_processor

            model, processor = load_model_and_processor(
                config.model, device=config.device, dtype=config.dtype, device_map=config.device_map,
                load_in_8bit=config.load_in_8bit, load_in_4bit=config.load_in_4bit,
            )
            count = describe_images(model, processor, images, described, config.describe)
            logger.info("describe: %d image(s) described.", count)
            del model
        if "refine" in config.steps:
            counts = refine_descriptions(make_refiner(config), described, refined, config.concurrency,
                                         config.refiner_batch_size)
            logger.info("refine: %d refined, %d failed (a rerun retries failed items).", counts["ok"],
                        counts["failed"])
        if "filter" in config.steps:
            counts = filter_items(described, refined, filtered, config.min_characters)
            logger.info("filter: %s", dict(counts) or "nothing new")
        if "review" in config.steps:
            path = Path(config.review_file) if config.review_file else work_dir / "review.tsv"
            rows = write_review_file(path, described, filtered)
            logger.info("review: wrote %d row(s) to %s; edit keep (1/0) and text, then run --steps export "
                        "--review-decisions %s", rows, path, path)
        if "export" in config.steps:
            items, summary = final_items(described, refined, filtered, decisions,
                                         [image_id for image_id, _ in images] if images else None)
            print(format_summary(summary))
            export_dataset(items, summary, config.output_dir, config.push_to_hub, config.private)
            logger.info("export: wrote %s (cc_sbu_align/, hf_dataset/, summary.json)", config.output_dir)
    return summary
