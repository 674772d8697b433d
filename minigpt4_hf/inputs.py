"""
Checks of the paths a user gives (model folders, training data, images, output folders) that run before anything
heavy is imported or loaded, so that a wrong path is reported at once, with what to do instead. Standard library only.

Every check raises `InputError` (a `ValueError`) with a one-line message that names the flag.
"""

import glob
import json
import os
import re
from pathlib import Path


# The weights' dtype names every tool's --dtype takes ("auto": the tool's policy, in its --help).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
TRAINER_STATE_FILE = "trainer_state.json"  # what `Trainer` writes into every checkpoint-N folder
# A saved MiniGPT-4 holds the vision tower under this name (old and new key layouts alike); a Trainer checkpoint of a
# run that trains only the projection (or LoRA) does not.
VISION_WEIGHTS_MARKER = "vision_model."
SAVED_MODEL_HELP = "a folder written by save_pretrained (minigpt4-convert, minigpt4-train, minigpt4-quickstart)"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SHARD_PATTERN_CHARACTERS = "*?[{"


class InputError(ValueError):
    """A path the user gave cannot be used as asked; the message names the flag and says what to do instead."""


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` with the Hub's characters, and not a relative path such as `./x` or `../x`."""
    return HUB_ID.fullmatch(text) is not None and not text.startswith(".")


# ---------------------------------------------------------------------------------------------------------------------
# Saved models.


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file, read from its JSON header alone."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    return [key for key in header if key != "__metadata__"]


def _weight_keys(folder: Path) -> list[str] | None:
    """The weight names a saved folder holds (safetensors only); None when it holds weights of another format."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        return _safetensors_keys(single)
    if any(folder.glob("pytorch_model*.bin")):
        return None
    return []


def trainer_checkpoint_step(folder: str | os.PathLike) -> int | None:
    """
    The step of a Trainer checkpoint folder that holds only the trained weights (the default of minigpt4-train), or
    None when `folder` is not such a checkpoint (a checkpoint written with --save-frozen-weights is a full model).
    """
    folder = Path(folder)
    state_file = folder / TRAINER_STATE_FILE
    if not state_file.is_file():
        return None
    keys = _weight_keys(folder)
    if keys is not None and any(VISION_WEIGHTS_MARKER in key for key in keys):
        return None
    try:
        return int(json.loads(state_file.read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError):
        return 0


def check_model_path(path: str | os.PathLike, flag: str = "--model") -> None:
    """
    Refuses what cannot be a saved MiniGPT-4: a missing folder (unless `path` looks like a Hub id, tried later), a
    file, a folder without `config.json`, and a Trainer checkpoint that holds only the trained weights.
    """
    text = str(path)
    folder = Path(path)
    if not folder.exists():
        if looks_like_hub_id(text):
            return
        raise InputError(f"{flag} {text}: no such folder. Give {SAVED_MODEL_HELP}, or a Hub id (owner/name).")
    if not folder.is_dir():
        raise InputError(f"{flag} {text} is a file; give the folder that holds config.json ({SAVED_MODEL_HELP}).")
    step = trainer_checkpoint_step(folder)
    if step is not None:
        raise InputError(
            f"{flag} {text} is a Trainer checkpoint (step {step}: trained weights and optimizer state only), not a "
            f"full model. Use the run's --output-dir (the full model is written there when the run ends; finish a "
            f"stopped run with minigpt4-train, the same flags and --resume {text}), or see docs/command-line.md, "
            "'Trainer checkpoints'."
        )
    if not (folder / "config.json").is_file():
        raise InputError(f"{flag} {text} has no config.json: it is not a saved model. Give {SAVED_MODEL_HELP}.")


def model_not_loadable_message(path: str, flag: str = "--model") -> str:
    """What to say when `path` passed `check_model_path` as a Hub id but loading it failed."""
    return (
        f"{flag} {path}: no such folder, and no model of that name could be loaded from the Hub (it does not exist, "
        f"is private, or the Hub cannot be reached). Give {SAVED_MODEL_HELP}, or an existing Hub id."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Training data.


def expand_braces(pattern: str) -> list[str]:
    """Expands webdataset/bash numeric ranges: `shard-{000..002}.tar` -> `shard-000.tar`, ..., `shard-002.tar`."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    expanded = []
    for number in range(int(first), int(last) + 1):
        expanded.extend(expand_braces(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end():]))
    return expanded


def find_webdataset_shards(path: str) -> list[str]:
    """The `.tar` shards a folder, a glob or a `{000..999}` pattern names (sorted); empty if it names none."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if path.endswith(".tar") and os.path.isfile(path):
        return [path]
    if any(char in path for char in SHARD_PATTERN_CHARACTERS):
        shards = [file for pattern in expand_braces(path) for file in sorted(glob.glob(pattern))]
        shards = [file for file in shards if file.endswith(".tar")]
        if shards or "{" not in path:
            return shards
    return []


def check_data_path(path: str, flag: str = "--data-path") -> None:
    """
    Refuses a training data path that names nothing (no file, folder or shard, and not shaped like a Hub dataset id)
    and the `image/` folder inside a cc_sbu_align folder.
    """
    stripped = path.rstrip("/" + os.sep)
    if Path(stripped).name == "image" and (Path(stripped).parent / "filter_cap.json").is_file():
        raise InputError(
            f"{flag} {path} is the image folder of a cc_sbu_align folder: point at the folder that holds "
            f"filter_cap.json ({Path(stripped).parent})."
        )
    if os.path.exists(path) or find_webdataset_shards(path):
        return
    if any(char in path for char in SHARD_PATTERN_CHARACTERS) or not looks_like_hub_id(path):
        raise InputError(
            f"{flag} {path!r} matches no file or folder. Give a cc_sbu_align folder (the one holding "
            "filter_cap.json), webdataset .tar shards (folder, glob or {00000..00099} range), a saved HF dataset, a "
            "data file or a Hub dataset id."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Images and outputs.


def check_file(path: str | os.PathLike, flag: str) -> None:
    """Refuses a missing file (what the file holds is checked where it is read)."""
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "no such file"
        raise InputError(f"{flag} {path}: {what}.")


def check_image_file(path: str | os.PathLike, flag: str = "--image") -> None:
    """Refuses a missing image file (whether the file decodes is the image opener's business)."""
    check_file(path, flag)


def check_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuses a missing folder."""
    if not Path(path).is_dir():
        what = "is a file, not a folder" if Path(path).exists() else "no such folder"
        raise InputError(f"{flag} {path}: {what}.")


def previous_run_entries(folder: str | os.PathLike) -> list[str]:
    """What in `folder` shows that a training run wrote there before: checkpoint-N folders and a saved model."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if (entry.name.startswith("checkpoint-") and entry.is_dir())
                  or entry.name in ("config.json", "trainer_state.json", "language_projection.safetensors"))
