"""
Reading the original MiniGPT-4 checkpoint files and mapping them onto `MiniGPT4ForConditionalGeneration`.

The original model is put together from four sources (the load order of `MiniGPT4.from_config`,
minigpt4/models/mini_gpt4.py@22d8888):

- `eva_vit_g.pth` (LAVIS): the EVA ViT-g with bare keys (`cls_token`, `blocks.{i}.attn.q_bias`, ...);
- `blip2_pretrained_flant5xxl.pth` (LAVIS): `{"model": {...}}` with `ln_vision.*`, `query_tokens`, `Qformer.bert.*`;
- a Vicuna / LLaMA folder in transformers format (weights, `config.json`, tokenizer);
- `pretrained_minigpt4.pth` / `prerained_minigpt4_7b.pth`: `{"model": {"llama_proj.weight", "llama_proj.bias"}}`.

A transformers BLIP-2 checkpoint (`Blip2ForConditionalGeneration`) can stand in for the first two.

The later releases need no BLIP-2 file: MiniGPT-4 with Llama-2 (`pretrained_minigpt4_llama2_7b.pth`) holds a
`llama_proj` of 4 x ViT width inputs, and MiniGPT-v2 (`minigptv2_checkpoint.pth`) also LoRA tensors for the language
model (`llama_model.base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight`). Which family a file is
follows from those shapes and keys (`detect_variant`); MiniGPT-v2's position embeddings are resized to 448 px once,
here, as the original did at every load (`interpolate_position_embedding`); the LoRA is merged into the weights or
written as a PEFT adapter (`plan_lora`).


Nothing is read into memory before it is written: the files are opened memory-mapped (`safe_open` for safetensors,
`torch.load(mmap=True)` for `.pth` / `.bin`), the key mapping and the configuration are worked out from names and
shapes alone, checked against the model built on the meta device, and the tensors are then read, converted and
written one at a time into each output shard (`write_safetensors_file`); the memory-mapped files are closed after each
shard. Peak memory is the process itself, a few tensors and the pages mapped for one shard, whatever the model size.

A Vicuna v0 language model can also be built here from LLaMA and the Vicuna delta (`read_vicuna_delta`), tensor by
tensor, as FastChat 0.1.10's `apply_delta` computed it.
"""

import dataclasses
import functools
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, split_torch_state_dict_into_shards
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from tqdm.auto import tqdm

from configuration_minigpt4 import MiniGPT4Config
from minigpt4_hf.inputs import InputError
from minigpt4_hf.recipe import RELEASED_LORA_DROPOUT
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration


class ConversionError(InputError):
    """Bad input: the message names the file (and key) at fault and says what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Key renaming: templates with placeholders, usable in both directions (the backward direction names the source key a
# missing model parameter should have come from).

_PLACEHOLDER_PATTERNS = {
    "layer": r"\d+",
    "param": r"weight|bias",
    "block": r"attention|crossattention",
    "fc": r"fc1|fc2",
    "norm": r"1|2",
    "rest": r".+",
}


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    pattern = "".join(
        f"(?P<{part[1:-1]}>{_PLACEHOLDER_PATTERNS[part[1:-1]]})" if part.startswith("{") else re.escape(part)
        for part in parts
    )
    return re.compile(f"^{pattern}$")


@dataclass(frozen=True)
class RenameRule:
    """`source` key template (original file) <-> `target` key template (converted model)."""

    source: str
    target: str

    def forward(self, key: str) -> str | None:
        match = _template_regex(self.source).match(key)
        return self.target.format(**match.groupdict()) if match else None

    def backward(self, key: str) -> str | None:
        match = _template_regex(self.target).match(key)
        return self.source.format(**match.groupdict()) if match else None


# The EVA ViT's attention has q and v biases but no k bias; the converted qkv bias is cat(q_bias, zeros, v_bias).
QKV_BIAS_SOURCES = ("blocks.{layer}.attn.q_bias", "blocks.{layer}.attn.v_bias")
QKV_BIAS_TARGET = "model.vision_model.encoder.layers.{layer}.self_attn.qkv.bias"


def qkv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """`(hidden,), (hidden,) -> (3 * hidden,)`: the fused qkv bias with a zero key part, as the original computed it."""
    return torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])


@dataclass(frozen=True)
class InputKind:
    """One kind of input file: the flag that takes it, how to recognise it, how its keys map."""

    flag: str
    description: str
    looks_like: Callable[[set[str]], bool] = field(repr=False)
    rules: tuple[RenameRule, ...]
    # (regex on the source key, why it is not loaded): keys the original ignored too.
    ignored: tuple[tuple[str, str], ...] = ()

    def target_of(self, key: str) -> str | None:
        for rule in self.rules:
            target = rule.forward(key)
            if target is not None:
                return target
        return None

    def sources_of(self, target: str) -> list[str]:
        """The source keys this kind of file must hold for the model parameter `target` (empty: not this file)."""
        if self.flag == "--vit-checkpoint":
            match = _template_regex(QKV_BIAS_TARGET).match(target)
            if match:
                return [template.format(**match.groupdict()) for template in QKV_BIAS_SOURCES]
        for rule in self.rules:
            source = rule.backward(target)
            if source is not None:
                return [source]
        return []

    def why_ignored(self, key: str) -> str | None:
        for pattern, why in self.ignored:
            if re.search(pattern, key):
                return why
        return None


# The parts of a transformers BLIP-2 checkpoint that MiniGPT-4 does not take (pattern, what it is).
BLIP2_NOT_READ = (
    (r"^language_model\.", "BLIP-2's own language model"),
    (r"^language_projection\.", "BLIP-2's projection into its own language model"),
)


def _has_prefix(*prefixes: str) -> Callable[[set[str]], bool]:
    return lambda keys: any(key.startswith(prefixes) for key in keys)


_VIT_LAYER = "model.vision_model.encoder.layers.{layer}"
KINDS = {
    "vit": InputKind(
        flag="--vit-checkpoint",
        description="an EVA ViT checkpoint (eva_vit_g.pth: bare keys 'cls_token', 'pos_embed', 'blocks.{i}.*')",
        looks_like=lambda keys: "pos_embed" in keys or any(key.startswith("blocks.") for key in keys),
        rules=(
            RenameRule("cls_token", "model.vision_model.embeddings.class_embedding"),
            RenameRule("pos_embed", "model.vision_model.embeddings.position_embedding"),
            RenameRule("patch_embed.proj.{param}", "model.vision_model.embeddings.patch_embedding.{param}"),
            RenameRule("blocks.{layer}.norm{norm}.{param}", _VIT_LAYER + ".layer_norm{norm}.{param}"),
            RenameRule("blocks.{layer}.attn.qkv.weight", _VIT_LAYER + ".self_attn.qkv.weight"),
            RenameRule("blocks.{layer}.attn.proj.{param}", _VIT_LAYER + ".self_attn.projection.{param}"),
            RenameRule("blocks.{layer}.mlp.{fc}.{param}", _VIT_LAYER + ".mlp.{fc}.{param}"),
        ),
    ),
    "qformer": InputKind(
        flag="--qformer-checkpoint",
        description="a BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth: {'model': {'query_tokens', 'ln_vision.*', "
        "'Qformer.bert.*'}})",
        looks_like=lambda keys: "query_tokens" in keys or any(key.startswith("Qformer.") for key in keys),
        rules=(
            RenameRule("ln_vision.{param}", "model.vision_model.post_layernorm.{param}"),
            RenameRule("query_tokens", "model.query_tokens"),
            RenameRule("Qformer.bert.embeddings.LayerNorm.{param}", "model.qformer.layernorm.{param}"),
            RenameRule(
                "Qformer.bert.encoder.layer.{layer}.{block}.self.{rest}",
                "model.qformer.encoder.layer.{layer}.{block}.attention.{rest}",
            ),
            RenameRule("Qformer.bert.encoder.layer.{layer}.{rest}", "model.qformer.encoder.layer.{layer}.{rest}"),
        ),
        ignored=(
            (r"^Qformer\.bert\.embeddings\.position_ids$", "buffer of the Q-Former's text embeddings (removed)"),
            (r"^t5_proj\.", "BLIP-2's projection into Flan-T5, not used by MiniGPT-4"),
        ),
    ),
    "projection": InputKind(
        flag="--projection-checkpoint",
        description="a MiniGPT-4 / MiniGPT-v2 checkpoint (pretrained_minigpt4.pth, pretrained_minigpt4_llama2_7b.pth, "
        "minigptv2_checkpoint.pth: {'model': {'llama_proj.weight', 'llama_proj.bias', LoRA tensors}})",
        looks_like=_has_prefix("llama_proj."),
        rules=(
            RenameRule("llama_proj.{param}", "model.language_projection.{param}"),
            # Not in the released files (ln_vision is frozen, and frozen weights are not saved), used if present.
            RenameRule("ln_vision.{param}", "model.vision_model.post_layernorm.{param}"),
        ),
    ),
    "blip2": InputKind(
        flag="--blip2",
        description="a transformers BLIP-2 checkpoint (keys 'vision_model.*', 'qformer.*', 'query_tokens')",
        looks_like=_has_prefix("vision_model.", "qformer."),
        rules=(
            RenameRule("vision_model.{rest}", "model.vision_model.{rest}"),
            RenameRule("qformer.{rest}", "model.qformer.{rest}"),
            RenameRule("query_tokens", "model.query_tokens"),
        ),
        ignored=BLIP2_NOT_READ,
    ),
    "llm": InputKind(
        flag="--llm",
        description="a LLaMA / Vicuna state dict in transformers format ('model.embed_tokens.weight', "
        "'model.layers.{i}.*', 'lm_head.weight')",
        looks_like=lambda keys: any("embed_tokens" in key for key in keys),
        rules=(
            RenameRule("model.{rest}", "model.language_model.{rest}"),
            RenameRule("lm_head.{rest}", "lm_head.{rest}"),
        ),
        ignored=((r"\.rotary_emb\.inv_freq$", "rotary frequencies, recomputed from the config"),),
    ),
}
# Prefixes of the BLIP-2 keys MiniGPT-4 takes (the rest of a BLIP-2 checkpoint is its own language model).
BLIP2_KEPT_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


# ---------------------------------------------------------------------------------------------------------------------
# Reading files without loading them.

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of an input file, known by its shape (and dtype, where the file says) before it is read."""

    origin: str  # "--vit-checkpoint /path/eva_vit_g.pth", for messages
    key: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    dtype: torch.dtype | None = field(default=None, compare=False)

    @classmethod
    def of(cls, tensor: torch.Tensor, origin: str, key: str) -> "SourceTensor":
        return cls(origin, key, tuple(tensor.shape), lambda: tensor, tensor.dtype)

    @property
    def is_floating_point(self) -> bool:
        return self.dtype is None or self.dtype.is_floating_point


class MappedTorchFile:
    """
    A `torch.save` file opened memory-mapped on first use and closed by `close()` (the converter closes its inputs
    after each output shard, so the pages read for one shard do not stay mapped into the next).

    Args:
        path: the file.
        unwrap: top-level entry that holds the state dict (`"model"` in LAVIS / MiniGPT-4 checkpoints), or None.
        weights_only: `torch.load`'s safe mode (tensors and plain containers only).
    """

    def __init__(self, path: Path, unwrap: str | None = None, weights_only: bool = True, mmap: bool = True):
        self.path = path
        self.unwrap = unwrap
        self.weights_only = weights_only
        self.mmap = mmap
        self._state: dict | None = None

    def state_dict(self) -> dict:
        if self._state is None:
            checkpoint = torch.load(self.path, map_location="cpu", weights_only=self.weights_only, mmap=self.mmap)
            self._state = checkpoint[self.unwrap] if self.unwrap is not None else checkpoint
        return self._state

    def get(self, key: str) -> torch.Tensor:
        return self.state_dict()[key]

    def close(self) -> None:
        if self.mmap:  # a file that could not be mapped stays loaded rather than being read again
            self._state = None


@dataclass
class InputFile:
    """The tensors of one input (a file, or the weight files of a folder), by source key."""

    kind: InputKind
    origin: str
    tensors: dict[str, SourceTensor]
    paths: list[Path] = field(default_factory=list)  # every file read, for the provenance record
    other_entries: list[str] = field(default_factory=list)  # top-level entries beside "model" (optimizer, ...)
    mapped_files: list[MappedTorchFile] = field(default_factory=list, repr=False)

    @classmethod
    def from_state_dict(cls, kind: InputKind, state_dict: dict, origin: str) -> "InputFile":
        """Wraps an in-memory state dict (tests, meta tensors)."""
        tensors = {key: SourceTensor.of(value, origin, key) for key, value in state_dict.items()}
        return cls(kind, origin, tensors)

    def close(self) -> None:
        """Unmaps the memory-mapped files (they are mapped again when a tensor is next read)."""
        for mapped in self.mapped_files:
            mapped.close()

    def check_kind(self) -> None:
        """Raises if the file does not hold what its flag takes, naming what it looks like instead."""
        keys = set(self.tensors)
        if not keys:
            raise ConversionError(f"{self.origin}: the file holds no tensors; expected {self.kind.description}.")
        if self.kind.looks_like(keys):
            return
        guesses = [kind for kind in KINDS.values() if kind is not self.kind and kind.looks_like(keys)]
        hint = (
            f" It looks like {guesses[0].description}: pass it as {guesses[0].flag}." if guesses else
            f" Its first keys: {', '.join(sorted(keys)[:5])}."
        )
        raise ConversionError(f"{self.origin} is not {self.kind.description}.{hint}")


def _mapped_source_tensors(
    mapped: MappedTorchFile, state_dict: dict, origin: str, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, SourceTensor], list[str]]:
    """`(tensors read through `mapped`, other entries)` of a loaded state dict (shapes and dtypes only)."""
    tensors, others = {}, []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            others.append(str(key))
        elif keep is None or keep(str(key)):
            tensors[str(key)] = SourceTensor(
                origin, str(key), tuple(value.shape), functools.partial(mapped.get, key), value.dtype
            )
    return tensors, others


def read_torch_checkpoint(path: str | Path, kind: InputKind, allow_unsafe_pickle: bool = False) -> InputFile:
    """
    Opens a `torch.save` checkpoint memory-mapped: a bare state dict, or `{"model": state_dict, "optimizer": ...}` as
    the LAVIS / MiniGPT-4 runners save them (the other top-level entries are listed, not loaded).
    """
    path = Path(path)
    origin = f"{kind.flag} {path}"
    if not path.exists():
        raise ConversionError(f"{origin}: no such file.")
    if path.is_dir():
        raise ConversionError(f"{origin}: is a folder; expected {kind.description}.")
    checkpoint, error = None, None
    for mmap in (True, False):  # checkpoints in the pre-1.6 (non-zip) format cannot be memory-mapped
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle, mmap=mmap)
            break
        except Exception as caught:  # noqa: BLE001 (torch raises many kinds for unreadable files)
            error = caught
    if checkpoint is None:
        hint = ""
        if "Weights only load failed" in str(error):
            hint = " The file pickles objects other than tensors; if you trust it, pass --allow-unsafe-pickle."
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConversionError(
            f"{origin}: cannot be read as a PyTorch checkpoint ({type(error).__name__}: {first_line}).{hint}"
        ) from None

    other_entries, unwrap = [], None
    if isinstance(checkpoint, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(checkpoint.get(wrapper), dict):
                other_entries = [str(key) for key in checkpoint if key != wrapper]
                checkpoint, unwrap = checkpoint[wrapper], wrapper
                break
    if not isinstance(checkpoint, dict):
        raise ConversionError(
            f"{origin}: holds a {type(checkpoint).__name__}, not a state dict; expected {kind.description}."
        )
    mapped = MappedTorchFile(path, unwrap, weights_only=not allow_unsafe_pickle, mmap=mmap)
    tensors, others = _mapped_source_tensors(mapped, checkpoint, origin)
    mapped.close()
    loaded = InputFile(kind, origin, tensors, paths=[path], other_entries=other_entries + others,
                       mapped_files=[mapped])
    loaded.check_kind()
    return loaded


_WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def find_weight_files(folder: Path) -> tuple[Path | None, list[Path], dict | None]:
    """`(index file, weight files, index weight map)` of a transformers checkpoint folder; none: `(None, [], None)`."""
    for index_name, single_name in _WEIGHT_FILES:
        if (folder / index_name).is_file():
            index = folder / index_name
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise ConversionError(f"{index}: not a readable checkpoint index ({error}).") from None
            return index, [folder / name for name in sorted(set(weight_map.values()))], weight_map
        if (folder / single_name).is_file():
            return None, [folder / single_name], None
    return None, [], None


def read_transformers_weights(
    folder: str | Path, kind: InputKind, keep: Callable[[str], bool] | None = None
) -> InputFile:
    """
    Opens the weights of a transformers checkpoint folder (safetensors or `.bin`, single or sharded) lazily; with
    `keep`, only the shards holding kept keys are opened (a BLIP-2 checkpoint's T5 shards are not needed).
    """
    folder = Path(folder)
    origin = f"{kind.flag} {folder}"
    if not folder.is_dir():
        raise ConversionError(f"{origin}: no such folder; expected a transformers checkpoint folder.")
    index, files, weight_map = find_weight_files(folder)
    if not files:
        raise ConversionError(
            f"{origin}: no weights found; expected model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json in the folder."
        )
    if weight_map is not None and keep is not None:
        files = [folder / name for name in sorted({name for key, name in weight_map.items() if keep(key)})]
    tensors: dict[str, SourceTensor] = {}
    mapped_files: list[MappedTorchFile] = []
    for path in files:
        if not path.is_file():
            raise ConversionError(f"{origin}: the index {index.name} lists {path.name}, which is missing.")
        try:
            file_tensors, mapped = _open_weight_file(path, origin, keep)
        except ConversionError:
            raise
        except Exception as error:  # noqa: BLE001
            raise ConversionError(f"{origin}: cannot read {path.name} ({type(error).__name__}: {error}).") from None
        tensors.update(file_tensors)
        mapped_files += [mapped] if mapped is not None else []
    paths = ([index] if index else []) + files
    loaded = InputFile(kind, origin, tensors, paths=paths, mapped_files=mapped_files)
    loaded.check_kind()
    return loaded


# Files of a transformers checkpoint besides its weights and config.json: what `download_checkpoint` fetches, when
# present, for a language model whose tokenizer is needed (the Vicuna delta).
CHECKPOINT_SIDE_FILES = (
    "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",
)


def download_checkpoint(
    repo_id: str, flag: str, keep: Callable[[str], bool] | None = None, side_files: Sequence[str] = ()
) -> Path:
    """
    Downloads from the Hub what the converter reads of a transformers checkpoint: `config.json`, the `side_files`
    that exist, and the weight files (of one format) holding the keys `keep` accepts (all without `keep`).
    Returns the snapshot folder.
    """
    origin = f"{flag} {repo_id}"
    try:
        folder = Path(hf_hub_download(repo_id, "config.json")).parent
        for name in side_files:
            try:
                hf_hub_download(repo_id, name)
            except EntryNotFoundError:
                continue
        for index_name, single_name in _WEIGHT_FILES:
            try:
                index_path = hf_hub_download(repo_id, index_name)
            except EntryNotFoundError:
                try:
                    hf_hub_download(repo_id, single_name)
                    return folder
                except EntryNotFoundError:
                    continue
            weight_map = json.loads(Path(index_path).read_text())["weight_map"]
            for name in sorted({name for key, name in weight_map.items() if keep is None or keep(key)}):
                hf_hub_download(repo_id, name)
            return folder
    except Exception as error:  # noqa: BLE001 (network, authentication, missing repository)
        raise ConversionError(
            f"{origin}: not a local folder, and fetching it from the Hub failed ({type(error).__name__}: {error})."
        ) from None
    raise ConversionError(f"{origin}: the Hub repository has no model.safetensors or pytorch_model.bin weights.")


def download_blip2_parts(repo_id: str) -> Path:
    """
    Downloads from the Hub only what MiniGPT-4 takes from a BLIP-2 checkpoint: `config.json` and the weight files
    holding `vision_model.*`, `qformer.*` and `query_tokens` (not the language-model shards). Returns the snapshot
    folder.
    """
    return download_checkpoint(repo_id, "--blip2", keep=lambda key: key.startswith(BLIP2_KEPT_PREFIXES))


def _open_weight_file(
    path: Path, origin: str, keep: Callable[[str], bool] | None
) -> tuple[dict[str, SourceTensor], MappedTorchFile | None]:
    """The tensors of one weight file (`.safetensors` opened per read, `.bin` memory-mapped) and its mapping."""
    origin = f"{origin} ({path.name})"
    tensors = {}
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if keep is None or keep(key):
                    tensor_slice = handle.get_slice(key)
                    tensors[key] = SourceTensor(
                        origin, key, tuple(tensor_slice.get_shape()), functools.partial(_read_safetensor, path, key),
                        _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype()),
                    )
        return tensors, None
    mapped = MappedTorchFile(path)
    state_dict = mapped.state_dict()
    tensors, _ = _mapped_source_tensors(mapped, state_dict, origin, keep)
    mapped.close()
    return tensors, mapped


def _read_safetensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(key)


# ---------------------------------------------------------------------------------------------------------------------
# Vicuna v0 = LLaMA + the Vicuna delta (FastChat 0.1.10 `fastchat/model/apply_delta.py`), tensor by tensor.

# Vicuna v0 added one token ('[PAD]', id 32000) to LLaMA's 32000: the delta's embedding and output head have more
# rows than the base's.
VOCABULARY_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
# The two halves of a Vicuna v0 language model; together they stand for `--llm`.
LLAMA_BASE_KIND = dataclasses.replace(
    KINDS["llm"], flag="--llama-base",
    description="a LLaMA checkpoint folder in transformers format ('model.embed_tokens.weight', 'model.layers.{i}.*')",
)
VICUNA_DELTA_KIND = dataclasses.replace(
    KINDS["llm"], flag="--vicuna-delta",
    description="a Vicuna v0 delta in transformers format (lmsys/vicuna-7b-delta-v0 or vicuna-13b-delta-v0)",
)


def apply_vicuna_delta(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """
    One Vicuna v0 tensor, as FastChat's `apply_delta` computed it: base and delta in float16, the base's embedding /
    head grown to the delta's rows with zero rows (`resize_token_embeddings`, then zeroed), then `base + delta` in
    float16. `(rows_base, ...), (rows_delta, ...) -> (rows_delta, ...)`.
    """
    base, delta = base.to(torch.float16), delta.to(torch.float16)
    if base.shape[0] < delta.shape[0]:
        base = torch.cat([base, base.new_zeros((delta.shape[0] - base.shape[0], *base.shape[1:]))])
    return base + delta


def _delta_shapes_fit(key: str, base_shape: tuple[int, ...], delta_shape: tuple[int, ...]) -> bool:
    if base_shape == delta_shape:
        return True
    return (
        key.endswith(VOCABULARY_KEYS) and len(base_shape) == len(delta_shape) == 2
        and base_shape[1] == delta_shape[1] and base_shape[0] < delta_shape[0]
    )


def _and_more(keys: list[str]) -> str:
    """' (and N more)' after the first of `keys` named in a message, or nothing for one key."""
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def read_vicuna_delta(base: InputFile, delta: InputFile) -> InputFile:
    """
    The Vicuna v0 language model as an input of kind `--llm`: each tensor reads the LLaMA base tensor and the delta
    tensor when it is written, and adds them (`apply_vicuna_delta`). Raises (naming file and key) when the delta does
    not fit the base: another model size, keys missing on either side.
    """
    for key, delta_tensor in delta.tensors.items():
        base_tensor = base.tensors.get(key)
        if base_tensor is not None and not _delta_shapes_fit(key, base_tensor.shape, delta_tensor.shape):
            raise ConversionError(
                f"{delta_tensor.origin}: key {key!r} has shape {list(delta_tensor.shape)}, but "
                f"{base_tensor.origin} has {list(base_tensor.shape)} for it: the delta belongs to another model "
                "size (vicuna-7b-delta-v0 goes with LLaMA-7B, vicuna-13b-delta-v0 with LLaMA-13B)."
            )
    missing = [key for key in base.tensors if key not in delta.tensors]
    extra = [key for key in delta.tensors if key not in base.tensors]
    if missing:
        raise ConversionError(f"{delta.origin} has no key {missing[0]!r}, which {base.tensors[missing[0]].origin} "
                              f"holds{_and_more(missing)}: the delta is not a Vicuna delta of this LLaMA.")
    if extra:
        raise ConversionError(f"{delta.tensors[extra[0]].origin}: key {extra[0]!r} has no counterpart in "
                              f"{base.origin}{_and_more(extra)}: the delta belongs to another model (a 13B delta on "
                              "a 7B LLaMA?).")
    origin = f"{base.origin} + {delta.origin}"
    tensors = {}
    for key, delta_tensor in delta.tensors.items():
        base_tensor = base.tensors[key]
        if base_tensor.is_floating_point:
            read = functools.partial(_read_vicuna_tensor, base_tensor.read, delta_tensor.read)
            dtype = torch.float16
        else:  # integer buffers are not deltas
            read, dtype = base_tensor.read, base_tensor.dtype
        tensors[key] = SourceTensor(f"{delta_tensor.origin} + {base_tensor.origin}", key, delta_tensor.shape, read,
                                    dtype)
    return InputFile(KINDS["llm"], origin, tensors, paths=base.paths + delta.paths,
                     mapped_files=base.mapped_files + delta.mapped_files)


def _read_vicuna_tensor(read_base: Callable[[], torch.Tensor], read_delta: Callable[[], torch.Tensor]) -> torch.Tensor:
    return apply_vicuna_delta(read_base(), read_delta())


# ---------------------------------------------------------------------------------------------------------------------
# The plan: every tensor of the converted model and where it comes from.


@dataclass(frozen=True)
class TargetTensor:
    """A tensor of the converted model: one source tensor renamed, or several combined (the ViT's q/v biases)."""

    sources: tuple[SourceTensor, ...]
    shape: tuple[int, ...]
    combine: Callable[..., torch.Tensor] | None = field(default=None, compare=False)

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype `materialize(dtype)` returns: `dtype` for floating-point tensors, the file's own for the rest."""
        if len(self.sources) == 1 and not self.sources[0].is_floating_point:
            return self.sources[0].dtype
        return dtype

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """Reads the source(s) and returns a fresh contiguous tensor (floating point cast to `dtype`)."""
        inputs = [source.read() for source in self.sources]
        tensor = self.combine(*inputs) if self.combine else inputs[0]
        converted = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if any(converted.data_ptr() == source.data_ptr() for source in inputs):  # never a view of an input file
            converted = converted.clone()
        return converted.contiguous()

    def describe(self) -> str:
        keys = " + ".join(repr(source.key) for source in self.sources)
        return f"{keys} in {self.sources[0].origin}"


@dataclass
class ConversionPlan:
    inputs: list[InputFile]
    tensors: dict[str, TargetTensor] = field(default_factory=dict)
    # (origin, what, why): not loaded, listed for the user.
    ignored: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def shape(self, target: str) -> tuple[int, ...]:
        """The shape of a model tensor; raises naming the source key when no input provides it."""
        if target not in self.tensors:
            raise ConversionError(self.missing_message([target]))
        return self.tensors[target].shape

    def layer_indices(self, prefix: str) -> list[int]:
        """Sorted `i` of the keys `prefix.{i}.*`."""
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        return sorted({int(m.group(1)) for key in self.tensors if (m := pattern.match(key))})

    def missing_message(self, targets: Iterable[str], limit: int = 8) -> str:
        targets = list(targets)
        lines = []
        for target in targets[:limit]:
            for loaded in self.inputs:
                sources = loaded.kind.sources_of(target)
                if sources:
                    absent = [source for source in sources if source not in loaded.tensors] or sources
                    keys = " and ".join(repr(source) for source in absent)
                    lines.append(f"{loaded.origin} has no key {keys} (needed for {target!r})")
                    break
            else:
                lines.append(f"no input provides {target!r}")
        more = f"; ... and {len(targets) - limit} more" if len(targets) > limit else ""
        return "Missing weights (the files are incomplete or of another model): " + "; ".join(lines) + more

    def drop_vision_layers_from(self, depth: int) -> None:
        """Drops ViT blocks `>= depth` (the real eva_vit_g.pth holds 40 blocks; MiniGPT-4 uses 39)."""
        available = self.layer_indices("model.vision_model.encoder.layers")
        dropped = [i for i in available if i >= depth]
        if not dropped:
            return
        origin = None
        for i in dropped:
            prefix = f"model.vision_model.encoder.layers.{i}."
            for key in [key for key in self.tensors if key.startswith(prefix)]:
                origin = self.tensors.pop(key).sources[0].origin
        blocks = f"block {dropped[0]}" if len(dropped) == 1 else f"blocks {dropped[0]}-{dropped[-1]}"
        self.notes.append(
            f"{origin} holds {len(available)} ViT blocks; the model uses the first {depth}: dropping {blocks}, "
            "as the original did."
        )
        self.ignored.append((origin, f"ViT {blocks}", f"beyond the configured depth of {depth}"))


def plan_conversion(inputs: list[InputFile]) -> ConversionPlan:
    """Maps every input's keys onto model keys; keys the original ignored are listed in `plan.ignored`."""
    plan = ConversionPlan(inputs)
    for loaded in inputs:
        kind = loaded.kind
        for entry in loaded.other_entries:
            plan.ignored.append((loaded.origin, entry, "top-level entry beside the weights (optimizer state, ...)"))
        qv_biases: dict[str, dict[str, SourceTensor]] = {}
        for key, source in loaded.tensors.items():
            why = kind.why_ignored(key)
            if why is not None:
                plan.ignored.append((loaded.origin, key, why))
                continue
            if kind.flag == "--vit-checkpoint":
                match = re.match(r"^blocks\.(\d+)\.attn\.(q|v)_bias$", key)
                if match:
                    qv_biases.setdefault(match.group(1), {})[match.group(2)] = source
                    continue
            target = kind.target_of(key)
            if target is None:
                plan.ignored.append((loaded.origin, key, "not a MiniGPT-4 weight (the original ignored it too)"))
                continue
            if target in plan.tensors:
                raise ConversionError(
                    f"{loaded.origin}: key {key!r} provides {target!r}, which "
                    f"{plan.tensors[target].describe()} already provides; pass each part once."
                )
            plan.tensors[target] = TargetTensor((source,), source.shape)
        for layer, biases in qv_biases.items():
            if set(biases) == {"q", "v"}:
                q_bias, v_bias = biases["q"], biases["v"]
                shape = (q_bias.shape[0] * 3,)
                plan.tensors[QKV_BIAS_TARGET.format(layer=layer)] = TargetTensor((q_bias, v_bias), shape, qkv_bias)
            # With only one of the two, the qkv bias stays missing and the coverage check names the absent key.
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# The configuration, from the shapes.


def _deep_update(base: dict, updates: dict) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_overrides(path: str | Path | None) -> dict:
    """Reads `--config-overrides`: a JSON object of MiniGPT4Config fields, sub-configs as nested objects."""
    if path is None:
        return {}
    path = Path(path)
    try:
        overrides = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"--config-overrides {path}: no such file.") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"--config-overrides {path}: not a readable JSON file ({error}).") from None
    if not isinstance(overrides, dict):
        raise ConversionError(f"--config-overrides {path}: must hold a JSON object, got {type(overrides).__name__}.")
    known = set(MiniGPT4Config.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConversionError(
            f"--config-overrides {path}: unknown MiniGPT4Config field(s) {unknown}; use e.g. "
            '{"vision_config": {"num_attention_heads": 16}, "qformer_config": {"num_attention_heads": 12}}.'
        )
    if "image_token_id" in overrides:
        raise ConversionError(
            f"--config-overrides {path}: image_token_id is set from the tokenizer (the id the processor gives "
            "'<ImageHere>'); remove it."
        )
    for name in ("vision_config", "qformer_config", "text_config"):
        if name in overrides and not isinstance(overrides[name], dict):
            raise ConversionError(f"--config-overrides {path}: {name} must be a JSON object.")
    return overrides


# Entries of an LLM's config.json that describe that file rather than the model.
_TEXT_CONFIG_DROPPED = ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


def text_config_dict(config) -> dict:
    """The language model's config as the `text_config` of a MiniGPT4Config (file-specific entries dropped)."""
    values = config.to_dict()
    for key in _TEXT_CONFIG_DROPPED:
        values.pop(key, None)
    return values


def _cross_attention_frequency(layers: int, cross_layers: list[int], preferred: int) -> int | None:
    """The `f` with cross-attention exactly in the layers `i % f == 0` (the preferred one if it fits)."""
    for frequency in [preferred, *range(1, layers + 1)]:
        if frequency >= 1 and [i for i in range(layers) if i % frequency == 0] == cross_layers:
            return frequency
    return None


def derive_config(
    plan: ConversionPlan,
    text_config: dict,
    overrides: dict,
    base: dict | None = None,
    variant: str = "vicuna0",
    **fields,
) -> MiniGPT4Config:
    """
    Builds the MiniGPT4Config: sizes from the tensors' shapes, head counts and the rest from `base` (the defaults, or
    a BLIP-2 checkpoint's config) and `overrides` (which win). Also drops ViT blocks beyond the configured depth and
    resizes the position embeddings to the image size the variant runs at.

    Args:
        plan: the mapped tensors.
        text_config: the language model's config (`config.json` of the LLM folder) as a dict.
        overrides: `--config-overrides`.
        base: `{"vision_config": {...}, "qformer_config": {...}, "num_query_tokens": n}` defaults.
        variant: the released family (see `detect_variant`): `"vicuna0"` has the Q-Former, the others merge tokens.
        fields: further MiniGPT4Config fields (`image_token_id`, `stop_token_ids`).
    """
    defaults = MiniGPT4Config()
    base = base or {}
    vision = _deep_update(defaults.vision_config.to_dict(), base.get("vision_config", {}))
    qformer = _deep_update(defaults.qformer_config.to_dict(), base.get("qformer_config", {}))
    vision_overrides = overrides.get("vision_config", {})
    qformer_overrides = overrides.get("qformer_config", {})
    use_qformer = variant == "vicuna0"
    merge = overrides.get("vision_token_merge", defaults.vision_token_merge)

    # ViT: width, patch, image size (the variant's, or the file's), MLP width, depth.
    position_shape = plan.shape("model.vision_model.embeddings.position_embedding")  # (1, 1 + grid**2, width)
    patch_shape = plan.shape("model.vision_model.embeddings.patch_embedding.weight")  # (width, 3, patch, patch)
    width, patch_size = position_shape[-1], patch_shape[-1]
    file_image_size = math.isqrt(position_shape[1] - 1) * patch_size
    image_size = vision_overrides.get("image_size", VARIANT_IMAGE_SIZES.get(variant, file_image_size))
    plan_position_embedding(plan, image_size)
    available_layers = plan.layer_indices("model.vision_model.encoder.layers")
    if not available_layers:
        raise ConversionError(plan.missing_message(["model.vision_model.encoder.layers.0.mlp.fc1.weight"]))
    vision.update(
        hidden_size=width,
        patch_size=patch_size,
        image_size=image_size,
        intermediate_size=plan.shape("model.vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        qkv_bias=True,
    )
    depth = vision_overrides.get("num_hidden_layers", min(vision["num_hidden_layers"], len(available_layers)))
    if depth > len(available_layers):
        raise ConversionError(
            plan.missing_message([f"model.vision_model.encoder.layers.{len(available_layers)}.mlp.fc1.weight"])
            + f" (the configuration asks for {depth} ViT blocks; the file holds {len(available_layers)})"
        )
    vision["num_hidden_layers"] = depth
    plan.drop_vision_layers_from(depth)

    bridge_fields = {"variant": variant, "use_qformer": use_qformer}
    if use_qformer:
        qformer, bridge_fields["num_query_tokens"] = _derive_qformer_config(plan, qformer, width)
        bridge_width, bridge = qformer["hidden_size"], f"the Q-Former has width {qformer['hidden_size']}"
    else:
        bridge_fields["vision_token_merge"] = merge
        bridge_width, bridge = merge * width, f"{merge} merged ViT tokens of width {width} give {merge * width}"

    # Projection (llama_proj): bridge width -> language-model width.
    projection_shape = plan.shape("model.language_projection.weight")  # (text_width, bridge_width)
    projection_source = plan.tensors["model.language_projection.weight"].describe()
    if projection_shape[1] != bridge_width:
        raise ConversionError(
            f"{projection_source} has shape {list(projection_shape)}: it takes features of width "
            f"{projection_shape[1]}, but {bridge} ({variant})."
        )
    text_width = text_config.get("hidden_size")
    if projection_shape[0] != text_width:
        raise ConversionError(
            f"{projection_source} has shape {list(projection_shape)}: it maps to width {projection_shape[0]}, but "
            f"the language model in --llm has hidden size {text_width}. "
            + ("The projection was trained for another Vicuna size (5120 = 13B, 4096 = 7B: pretrained_minigpt4.pth "
               "goes with Vicuna-13B v0, prerained_minigpt4_7b.pth with Vicuna-7B v0); pass the matching pair."
               if use_qformer else
               "The projection was trained for Llama-2-7B-chat (hidden size 4096); pass that language model.")
        )

    merged = {
        "vision_config": _deep_update(vision, vision_overrides),
        "qformer_config": _deep_update(qformer, qformer_overrides),
        "text_config": _deep_update(text_config, overrides.get("text_config", {})),
        **bridge_fields,
        **fields,
    }
    merged.update({key: value for key, value in overrides.items() if not key.endswith("_config")})
    parts = [("vision_config", merged["vision_config"])] + ([("qformer_config", merged["qformer_config"])]
                                                            if use_qformer else [])
    for name, part in parts:
        heads = part.get("num_attention_heads")
        if not heads or part["hidden_size"] % heads:
            raise ConversionError(
                f"The {name.split('_')[0]} width {part['hidden_size']} is not divisible by {heads} attention heads "
                f"(the default). Head counts cannot be read from the weights: pass --config-overrides with "
                f'{{"{name}": {{"num_attention_heads": N}}}}.'
            )
    try:
        return MiniGPT4Config(**merged)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"Invalid configuration (check --config-overrides): {error}") from None


def _derive_qformer_config(plan: ConversionPlan, qformer: dict, vision_width: int) -> tuple[dict, int]:
    """The Q-Former's width, depth, FFN width and cross-attention layers from the shapes; and the number of queries."""
    query_shape = plan.shape("model.query_tokens")  # (1, num_query_tokens, qformer_width)
    qformer_layers = plan.layer_indices("model.qformer.encoder.layer")
    if not qformer_layers:
        raise ConversionError(plan.missing_message(["model.qformer.encoder.layer.0.intermediate_query.dense.weight"]))
    cross_layers = [
        i
        for i in qformer_layers
        if f"model.qformer.encoder.layer.{i}.crossattention.attention.key.weight" in plan.tensors
    ]
    frequency = _cross_attention_frequency(len(qformer_layers), cross_layers, qformer["cross_attention_frequency"])
    if frequency is None:
        raise ConversionError(
            f"The Q-Former has cross-attention in layers {cross_layers} of {len(qformer_layers)}, which is not "
            "every n-th layer starting at 0; the files are not a BLIP-2 Q-Former."
        )
    qformer = dict(
        qformer,
        hidden_size=query_shape[-1],
        num_hidden_layers=len(qformer_layers),
        intermediate_size=plan.shape("model.qformer.encoder.layer.0.intermediate_query.dense.weight")[0],
        cross_attention_frequency=frequency,
    )
    if cross_layers:
        cross_key = f"model.qformer.encoder.layer.{cross_layers[0]}.crossattention.attention.key.weight"
        if plan.shape(cross_key)[1] != vision_width:
            raise ConversionError(
                f"{plan.tensors[cross_key].describe()} has shape {list(plan.shape(cross_key))}: the Q-Former "
                f"attends to image features of width {plan.shape(cross_key)[1]}, but the ViT "
                f"({plan.tensors['model.vision_model.embeddings.position_embedding'].sources[0].origin}) has width "
                f"{vision_width}. The two files do not belong together."
            )
    return qformer, query_shape[1]


# ---------------------------------------------------------------------------------------------------------------------
# The released families: which one a checkpoint is, and what each needs beyond renaming.

# The image size a family runs at when it differs from the ViT file's 224 px (`minigpt4/configs/models/
# minigpt_v2.yaml@d94738a`: image_size 448).
VARIANT_IMAGE_SIZES = {"v2": 448}
# Vocabulary sizes of the released language models: Vicuna v0 = LLaMA's 32000 + "[PAD]"; Llama-2-chat = 32000.
VICUNA_V0_VOCABULARY = 32001
LLAMA2_VOCABULARY = 32000

# `<module>.lora_A.weight` as peft 0.2.0 saved it, `<module>.lora_A.default.weight` as peft >= 0.3 does; `<module>`
# under MiniGPT's `llama_model.` and peft's `base_model.model.` prefixes.
_LORA_KEY = re.compile(
    r"^(?:llama_model\.)?(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$"
)


def split_lora_tensors(checkpoint: InputFile) -> dict[str, SourceTensor]:
    """Takes every LoRA tensor (a key with `lora_`) out of the checkpoint's tensors and returns them by key."""
    lora = {key: source for key, source in checkpoint.tensors.items() if "lora_" in key}
    for key in lora:
        del checkpoint.tensors[key]
    return lora


def detect_variant(plan: ConversionPlan, has_lora: bool, requested: str | None = None, merge: int = 4) -> str:
    """
    Which released family the projection belongs to, from its input width: the Q-Former's (768) -> `"vicuna0"`;
    `merge` x the ViT width (4 x 1408 = 5632) -> `"llama2"`, or `"v2"` when the checkpoint has LoRA tensors.
    `requested` (`--variant`) picks the family itself, but must fit the projection.
    """
    projection_shape = plan.shape("model.language_projection.weight")  # (text_width, bridge_width)
    vit_width = plan.shape("model.vision_model.embeddings.position_embedding")[-1]
    qformer_width = plan.shape("model.query_tokens")[-1] if "model.query_tokens" in plan.tensors else 768
    in_features = projection_shape[1]
    if in_features == merge * vit_width:
        detected = "v2" if has_lora else "llama2"
    elif in_features == qformer_width:
        detected = "vicuna0"
    else:
        raise ConversionError(
            f"{plan.tensors['model.language_projection.weight'].describe()} has shape {list(projection_shape)}: its "
            f"input width {in_features} fits no MiniGPT bridge: neither the Q-Former width {qformer_width} (MiniGPT-4 "
            f"with Vicuna) nor {merge} x the ViT width {vit_width} = {merge * vit_width} (MiniGPT-4 with Llama-2, "
            "MiniGPT-v2). The projection and the ViT file do not belong together"
            + ("." if "model.query_tokens" in plan.tensors else
               ", or it is MiniGPT-4 with Vicuna with a Q-Former of another width: pass --qformer-checkpoint too.")
        )
    if requested is None:
        return detected
    if (requested == "vicuna0") != (detected == "vicuna0"):
        raise ConversionError(
            f"--variant {requested} does not fit {plan.tensors['model.language_projection.weight'].describe()}: its "
            f"shape {list(projection_shape)} is the projection of "
            + ("MiniGPT-4 with Vicuna (after the Q-Former)." if detected == "vicuna0" else
               "MiniGPT-4 with Llama-2 / MiniGPT-v2 (merged ViT tokens).")
        )
    return requested


def check_vocabulary_fits_variant(vocabulary: int, variant: str, llm_origin: str) -> None:
    """
    Refuses the released language models crossed: Llama-2 (32000) with Vicuna v0's projection, and vice versa.
    `llm_origin` names the language model's input (`--llm DIR`) in the message.
    """
    if variant == "vicuna0" and vocabulary == LLAMA2_VOCABULARY:
        raise ConversionError(
            f"{llm_origin}: the tokenizer has {vocabulary} tokens, the vocabulary of Llama-2 / Vicuna v1.1 and "
            f"later, but the projection checkpoint is MiniGPT-4 with Vicuna v0, whose vocabulary is "
            f"{VICUNA_V0_VOCABULARY} (LLaMA's 32000 + '[PAD]'). Pass the Vicuna v0 weights with their tokenizer, or "
            "the Llama-2 projection (pretrained_minigpt4_llama2_7b.pth) for this model."
        )
    if variant != "vicuna0" and vocabulary == VICUNA_V0_VOCABULARY:
        raise ConversionError(
            f"{llm_origin}: the tokenizer has {vocabulary} tokens, the vocabulary of Vicuna v0, but the projection "
            f"checkpoint is MiniGPT-4 with Llama-2 / MiniGPT-v2 (--variant {variant}), trained with "
            f"Llama-2-7B-chat ({LLAMA2_VOCABULARY} tokens). Pass meta-llama/Llama-2-7b-chat-hf."
        )


def drop_qformer_parts(plan: ConversionPlan) -> None:
    """
    Without the Q-Former (MiniGPT-4 with Llama-2, MiniGPT-v2) the BLIP-2 file's Q-Former, queries and `ln_vision` are
    not used: the original never loads `ln_vision` then (`minigpt4/models/minigpt4.py@d94738a`, `has_qformer`).
    """
    for name in list(plan.tensors):
        target = plan.tensors[name]
        origin = target.sources[0].origin
        from_blip2 = origin.startswith((KINDS["qformer"].flag, KINDS["blip2"].flag))
        unused = name.startswith(("model.qformer.", "model.query_tokens")) or (
            name.startswith("model.vision_model.post_layernorm.") and from_blip2
        )
        if unused:
            plan.tensors.pop(name)
            plan.ignored.append((origin, target.sources[0].key, "no Q-Former and no BLIP-2 ln_vision in this variant"))


def plan_default_layernorm(plan: ConversionPlan) -> None:
    """`ln_vision` as the original has it without the Q-Former: `nn.LayerNorm`'s initial weight 1 and bias 0."""
    width = plan.shape("model.vision_model.embeddings.position_embedding")[-1]
    added = []
    for parameter, fill in (("weight", torch.ones), ("bias", torch.zeros)):
        name = f"model.vision_model.post_layernorm.{parameter}"
        if name not in plan.tensors:
            source = SourceTensor("nn.LayerNorm's initialisation", f"ln_vision.{parameter}", (width,),
                                  functools.partial(fill, width))
            plan.tensors[name] = TargetTensor((source,), (width,))
            added.append(parameter)
    if added:
        plan.notes.append(
            "ln_vision (vision_model.post_layernorm): weight 1, bias 0, eps 1e-5, as in the original, which never "
            "loads it without the Q-Former."
        )


def interpolate_position_embedding(position_embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """
    `(1, 1 + g * g, width) -> (1, 1 + grid * grid, width)`, float32: the patch positions resized as a `g x g` image
    (bicubic, `align_corners=False`), the class token's kept, exactly as the original's `interpolate_pos_embed`
    (`minigpt4/models/eva_vit.py@d94738a`) did to `eva_vit_g.pth` at every MiniGPT-v2 load.
    """
    position_embedding = position_embedding.float()
    width = position_embedding.shape[-1]
    old_grid = math.isqrt(position_embedding.shape[1] - 1)
    patches = position_embedding[:, 1:].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([position_embedding[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def plan_position_embedding(plan: ConversionPlan, image_size: int) -> None:
    """Resizes the planned ViT position embeddings to `image_size` (nothing to do when the file has that size)."""
    name = "model.vision_model.embeddings.position_embedding"
    plan.shape(name)  # raises naming the missing key
    target = plan.tensors[name]
    positions, width = target.shape[1], target.shape[-1]
    patch_size = plan.shape("model.vision_model.embeddings.patch_embedding.weight")[-1]
    old_grid = math.isqrt(positions - 1)
    if old_grid * old_grid != positions - 1:
        raise ConversionError(
            f"{target.describe()} has shape {list(target.shape)}: not 1 + a square grid of positions, so the ViT "
            f"cannot run at {image_size} px (its position embeddings cannot be resized to a {image_size}-px grid)."
        )
    if image_size % patch_size:
        raise ConversionError(
            f"Image size {image_size} is not a multiple of the ViT's {patch_size}-px patches "
            f"({plan.tensors['model.vision_model.embeddings.patch_embedding.weight'].describe()}); check "
            "--config-overrides vision_config.image_size."
        )
    grid = image_size // patch_size
    if grid == old_grid:
        return
    if target.combine is not None:
        raise ConversionError(f"{target.describe()}: the position embeddings are already computed from several keys.")
    plan.tensors[name] = TargetTensor(
        target.sources, (1, 1 + grid * grid, width), functools.partial(interpolate_position_embedding, grid=grid)
    )
    plan.notes.append(
        f"{target.describe()}: position embeddings resized from {old_grid}x{old_grid} to {grid}x{grid} for "
        f"{image_size}-px images (bicubic, in float32, class token kept, as the original did at load)."
    )


@dataclass
class LoraPlan:
    """The LoRA of a checkpoint: rank (from the shapes), alpha (given), and per model weight its `(A, B)` tensors."""

    rank: int
    alpha: float
    modules: dict[str, tuple[SourceTensor, SourceTensor]]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> list[str]:
        """The adapted modules' own names (`q_proj`, `v_proj`), as PEFT's `target_modules`."""
        return sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in self.modules})

    def adapter_tensors(self) -> dict[str, TargetTensor]:
        """The tensors of a PEFT adapter for the converted model: `base_model.model.<module>.lora_{A,B}.weight`."""
        tensors = {}
        for name, (lora_a, lora_b) in self.modules.items():
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = TargetTensor((lora_a,), lora_a.shape)
            tensors[f"base_model.model.{module}.lora_B.weight"] = TargetTensor((lora_b,), lora_b.shape)
        return tensors

    def adapter_config(self) -> dict:
        """`LoraConfig` arguments of the released adapter (`minigpt4/models/base_model.py@d94738a`, `init_llm`)."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": RELEASED_LORA_DROPOUT,
            "target_modules": self.target_modules,
            "bias": "none",
        }


def plan_lora(plan: ConversionPlan, lora_tensors: dict[str, SourceTensor], alpha: float) -> LoraPlan | None:
    """
    Matches every LoRA tensor to a weight of the planned language model, checking pairs, rank and shapes; every
    tensor must be consumed (the original loaded them with `strict=False`, so a name mismatch silently dropped the
    LoRA). Returns `None` without LoRA tensors.
    """
    if not lora_tensors:
        return None
    pairs: dict[str, dict[str, SourceTensor]] = {}
    for key, source in lora_tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ConversionError(
                f"{source.origin}: key {key!r} is a LoRA tensor but not '<module>.lora_A.weight' / "
                "'<module>.lora_B.weight' (peft's names, optionally with '.default'); it cannot be used."
            )
        target = KINDS["llm"].target_of(match["module"] + ".weight")
        if target not in plan.tensors:
            raise ConversionError(_unmatched_lora_message(plan, key, source, match["module"]))
        pairs.setdefault(target, {})[match["part"]] = source
    modules, ranks = {}, set()
    for target, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            present = next(iter(parts.values()))
            missing = "B" if "A" in parts else "A"
            raise ConversionError(
                f"{present.origin}: key {present.key!r} has no lora_{missing} partner; the checkpoint is incomplete."
            )
        lora_a, lora_b = parts["A"], parts["B"]
        weight = plan.tensors[target]
        out_features, in_features = weight.shape
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank):
            raise ConversionError(
                f"{lora_a.origin}: keys {lora_a.key!r} {list(lora_a.shape)} and {lora_b.key!r} "
                f"{list(lora_b.shape)} do not fit {weight.describe()} {list(weight.shape)}: a LoRA of rank r needs "
                f"[r, {in_features}] and [{out_features}, r]. The LoRA belongs to another language-model size."
            )
        ranks.add(rank)
        modules[target] = (lora_a, lora_b)
    if len(ranks) > 1:
        raise ConversionError(
            f"{next(iter(lora_tensors.values())).origin}: the LoRA tensors have different ranks {sorted(ranks)}; "
            "one adapter has one rank."
        )
    return LoraPlan(rank=ranks.pop(), alpha=alpha, modules=modules)


def _unmatched_lora_message(plan: ConversionPlan, key: str, source: SourceTensor, module: str) -> str:
    layer = re.search(r"(^|\.)layers\.(\d+)\.", module)
    if layer:
        first_layer = KINDS["llm"].target_of(module[: layer.start(2)] + "0" + module[layer.end(2):] + ".weight")
        if first_layer in plan.tensors:
            prefix = first_layer[: first_layer.index(".layers.") + len(".layers")]
            count = len(plan.layer_indices(prefix))
            return (
                f"{source.origin}: key {key!r} is LoRA for layer {layer.group(2)}, but the language model in --llm "
                f"has {count} layers (0-{count - 1}). The checkpoint belongs to a language model of another size."
            )
    return (
        f"{source.origin}: key {key!r} matches no layer of the language model in --llm (no weight "
        f"'{module}.weight'). Every LoRA tensor must be used: is the checkpoint for another model?"
    )


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`W + scaling * B @ A` in float32: peft's LoRA forward (`W x + B A x * alpha / r`) folded into the weight."""
    return weight.float() + scaling * (lora_b.float() @ lora_a.float())


def plan_lora_merge(plan: ConversionPlan, lora: LoraPlan) -> None:
    """Replaces each adapted weight of the plan by its LoRA-merged value (computed in float32 when written)."""
    for name, (lora_a, lora_b) in lora.modules.items():
        weight = plan.tensors[name]
        plan.tensors[name] = TargetTensor(
            (weight.sources[0], lora_a, lora_b), weight.shape,
            functools.partial(merge_lora_weight, scaling=lora.scaling),
        )
    plan.notes.append(
        f"LoRA (rank {lora.rank}, alpha {lora.alpha:g}, scaling {lora.scaling:g}) merged into {len(lora.modules)} "
        f"weights of the language model ({', '.join(lora.target_modules)}), in float32."
    )


def save_lora_adapter(lora: LoraPlan, folder: Path, dtype: torch.dtype) -> None:
    """Writes `lora` as a standard PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`)."""
    from peft import LoraConfig

    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(**lora.adapter_config()).save_pretrained(folder)
    entries = [(name, target.shape, target.output_dtype(dtype), functools.partial(target.materialize, dtype))
               for name, target in lora.adapter_tensors().items()]
    write_safetensors_file(folder / "adapter_model.safetensors", entries, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------------
# Checking against the model and writing.


def expected_model_shapes(config: MiniGPT4Config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of everything `save_pretrained` would write for `config` (model built on the meta device)."""
    with torch.device("meta"):
        model = MiniGPT4ForConditionalGeneration(config)
    shapes, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied weights are written once
            continue
        seen.add(id(tensor))
        shapes[name] = tuple(tensor.shape)
    return shapes


def check_against_model(plan: ConversionPlan, config: MiniGPT4Config) -> list[str]:
    """
    Checks that the plan provides every model tensor with the right shape; keys the model has no place for are moved
    to `plan.ignored`. Returns the model's tensor names, in model order.
    """
    expected = expected_model_shapes(config)
    missing = [name for name in expected if name not in plan.tensors]
    if missing:
        raise ConversionError(plan.missing_message(missing))
    mismatched = [name for name, shape in expected.items() if plan.tensors[name].shape != shape]
    if mismatched:
        lines = [
            f"{plan.tensors[name].describe()} has shape {list(plan.tensors[name].shape)}, but the model built from "
            f"the other files needs {list(expected[name])} for {name!r}"
            for name in mismatched[:8]
        ]
        raise ConversionError(
            "Shape mismatch (files of different model sizes, or a head count / size in --config-overrides that "
            "does not fit): " + "; ".join(lines)
        )
    for name in [name for name in plan.tensors if name not in expected]:
        target = plan.tensors.pop(name)
        plan.ignored.append(
            (target.sources[0].origin, target.sources[0].key, "not a MiniGPT-4 weight (the original ignored it too)")
        )
    return list(expected)


def write_safetensors_file(
    path: Path,
    entries: Sequence[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """
    Writes a safetensors file one tensor at a time: the header is built from the announced names, shapes and dtypes,
    then each `produce()` is called, checked against its announcement, written and dropped. Only one tensor is in
    memory at a time (`safetensors.torch.save_file` would hold the whole file, twice).

    Args:
        entries: `(name, shape, dtype, produce)` per tensor.
    """
    # Wider dtypes first (then by name), as safetensors' own writer orders them: every tensor is aligned to its size.
    ordered = sorted(entries, key=lambda entry: (-entry[2].itemsize, entry[0]))
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype, _ in ordered:
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: safetensors cannot store {dtype}.")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for name, shape, dtype, produce in ordered:
            tensor = produce()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(
                    f"{name}: announced {list(shape)} {dtype}, produced {list(tensor.shape)} {tensor.dtype}."
                )
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def save_sharded_safetensors(
    plan: ConversionPlan,
    names: list[str],
    folder: Path,
    dtype_of: Callable[[str], torch.dtype],
    max_shard_size: int | str,
) -> list[str]:
    """
    Writes `names` as `model.safetensors` or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`,
    reading each tensor only when it is written (`write_safetensors_file`) and closing the memory-mapped inputs after
    each shard. Returns the file names written.
    """
    dtypes = {name: plan.tensors[name].output_dtype(dtype_of(name)) for name in names}
    sizes = {name: torch.empty(plan.tensors[name].shape, dtype=dtypes[name], device="meta") for name in names}
    split = split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_size)
    written = []
    total_bytes = sum(tensor.numel() * tensor.element_size() for tensor in sizes.values())
    with tqdm(total=total_bytes, desc="writing", unit="B", unit_scale=True, disable=None) as progress:
        for filename, shard_names in split.filename_to_tensors.items():

            def produce(name: str) -> torch.Tensor:
                tensor = plan.tensors[name].materialize(dtype_of(name))
                progress.update(tensor.numel() * tensor.element_size())
                return tensor

            entries = [
                (name, plan.tensors[name].shape, dtypes[name], functools.partial(produce, name)) for name in shard_names
            ]
            write_safetensors_file(folder / filename, entries, metadata={"format": "pt"})
            for loaded in plan.inputs:
                loaded.close()
            written.append(filename)
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    return written


def summarize_ignored(ignored: list[tuple[str, str, str]], limit: int = 6) -> list[str]:
    """One line per (file, reason): the keys not loaded, the first few by name."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for origin, what, why in ignored:
        grouped.setdefault((origin, why), []).append(what)
    lines = []
    for (origin, why), keys in grouped.items():
        shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
        lines.append(f"{origin}: not loaded ({why}): {shown}")
    return lines
