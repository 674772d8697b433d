"""
`minigpt4-convert --llama-base DIR --vicuna-delta DIR_OR_ID`: Vicuna v0 built from LLaMA + the Vicuna delta while
converting (FastChat 0.1.10's `apply_delta`: both in float16, the base's embedding and head grown by zero rows to the
delta's 32001, then added), so nobody needs FastChat first.

The inputs are tiny random LLaMA folders, in sharded safetensors and sharded `pytorch_model.bin`, next to the tiny
original-format vision files.
"""

import json
import shutil

import pytest
import torch
from conftest import ORIGINAL_TINY
from huggingface_hub.errors import EntryNotFoundError
from minigpt4_hf.cli.convert import main as convert_main
from minigpt4_hf.cli.options import UserError
from minigpt4_hf.conversion import KINDS
from safetensors import safe_open
from safetensors.torch import save_file

from test_convert import fixture_argv


WEIGHTS = ORIGINAL_TINY / "weights"
LLAMA_TINY = WEIGHTS / "vicuna_tiny"  # hidden 64, 2 layers, vocabulary 1000: the tiny LLaMA
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def llama_state(vocab_size: int = 1000, hidden: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the tiny LLaMA's keys (its shapes, or another width / vocabulary)."""
    reference = torch.load(LLAMA_TINY / "pytorch_model.bin", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in reference.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        shape = [hidden if size == 64 else size for size in value.shape]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            shape[0] = vocab_size
        state[key] = torch.randn(shape, generator=generator).to(torch.float16)
    return state


def write_llama_folder(folder, state: dict, weight_format: str, vocab_size: int, added_tokens: dict | None = None):
    """A transformers LLaMA folder: `state` in two shards of `weight_format` + index, config and tokenizer files."""
    folder.mkdir(parents=True)
    keys = list(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for number, shard_keys in enumerate(halves, start=1):
        if weight_format == "safetensors":
            name = f"model-{number:05d}-of-00002.safetensors"
            save_file({key: state[key].contiguous() for key in shard_keys}, folder / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{number:05d}-of-00002.bin"
            torch.save({key: state[key] for key in shard_keys}, folder / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index_name = "model.safetensors.index.json" if weight_format == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((LLAMA_TINY / "config.json").read_text())
    config.update(vocab_size=vocab_size, hidden_size=state["model.norm.weight"].shape[0])
    (folder / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(LLAMA_TINY / name, folder / name)
    if added_tokens:
        (folder / "added_tokens.json").write_text(json.dumps(added_tokens))
    return folder


def delta_argv(output_dir, base, delta, extra=()) -> list[str]:
    return fixture_argv(output_dir, {"--llm": None, "--llama-base": base, "--vicuna-delta": delta}, extra=extra)


def saved_language_model(folder) -> dict[str, torch.Tensor]:
    """The converted folder's language-model tensors, under the LLaMA keys they came from."""
    targets = {KINDS["llm"].target_of(key): key for key in llama_state()}
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update({targets[key]: handle.get_tensor(key) for key in handle.keys() if key in targets})
    return tensors


@pytest.fixture(scope="module", params=[("safetensors", "bin"), ("bin", "safetensors")],
                ids=["safetensors-base-bin-delta", "bin-base-safetensors-delta"])
def delta_conversion(request, tmp_path_factory):
    base_format, delta_format = request.param
    root = tmp_path_factory.mktemp(f"delta-{base_format}-{delta_format}")
    base_state, delta_state = llama_state(1000, seed=1), llama_state(1001, seed=2)
    base = write_llama_folder(root / "llama", base_state, base_format, 1000)
    delta = write_llama_folder(root / "vicuna-delta", delta_state, delta_format, 1001, {"[PAD]": 1000})
    output_dir = root / "out"
    assert convert_main(delta_argv(output_dir, base, delta, extra=("--max-shard-size", "200KB"))) == 0
    return base_state, delta_state, output_dir


def test_every_language_model_tensor_is_base_plus_delta_in_float16(delta_conversion):
    base_state, delta_state, output_dir = delta_conversion
    saved = saved_language_model(output_dir)
    assert saved.keys() == base_state.keys()
    for key, base in base_state.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            base = torch.cat([base, torch.zeros(1, base.shape[1], dtype=base.dtype)])  # Vicuna v0's added row
        assert torch.equal(saved[key], base + delta_state[key]), key


def test_the_added_vocabulary_row_is_the_delta_row(delta_conversion):
    _, delta_state, output_dir = delta_conversion
    saved = saved_language_model(output_dir)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert saved[key].shape == (1001, 64)
        assert torch.equal(saved[key][1000], delta_state[key][1000])


def test_vocabulary_and_tokenizer_come_from_the_delta(delta_conversion):
    _, _, output_dir = delta_conversion
    config = json.loads((output_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 1001
    assert config["image_token_id"] == 1001  # after the delta's '[PAD]'
    tokenizer = json.loads((output_dir / "tokenizer.json").read_text())
    assert {"content": "[PAD]", "id": 1000}.items() <= next(
        token for token in tokenizer["added_tokens"] if token["id"] == 1000
    ).items()


def test_model_card_records_base_and_delta_files(delta_conversion):
    _, _, output_dir = delta_conversion
    card = (output_dir / "README.md").read_text()
    assert "`--llama-base`" in card and "`--vicuna-delta`" in card


def test_float32_output_keeps_the_float16_sum(tmp_path):
    base_state, delta_state = llama_state(1000, seed=3), llama_state(1001, seed=4)
    base = write_llama_folder(tmp_path / "llama", base_state, "safetensors", 1000)
    delta = write_llama_folder(tmp_path / "delta", delta_state, "bin", 1001, {"[PAD]": 1000})
    assert convert_main(delta_argv(tmp_path / "out", base, delta, extra=("--dtype", "float32"))) == 0
    saved = saved_language_model(tmp_path / "out")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert saved[key].dtype == torch.float32
    assert torch.equal(saved[key], (base_state[key] + delta_state[key]).float())


def test_delta_hub_id_fetches_config_tokenizer_and_weights(tmp_path, monkeypatch):
    base = write_llama_folder(tmp_path / "llama", llama_state(1000, seed=5), "safetensors", 1000)
    hub = write_llama_folder(tmp_path / "hub", llama_state(1001, seed=6), "bin", 1001, {"[PAD]": 1000})
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "lmsys/vicuna-tiny-delta-v0"
        requested.append(filename)
        if not (hub / filename).exists():
            raise EntryNotFoundError(filename)
        shutil.copy(hub / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr("minigpt4_hf.conversion.hf_hub_download", fake_download)
    assert convert_main(delta_argv(tmp_path / "out", base, "lmsys/vicuna-tiny-delta-v0")) == 0
    assert {"config.json", "tokenizer.model", "added_tokens.json", "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"} <= set(requested)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming file and key, exit 2, nothing left behind.


@pytest.fixture
def output_parent(tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


def refused(argv, output_parent) -> str:
    """The one-line message of the refusal (the tool prints it as `minigpt4-convert: error: ...`, exit 2)."""
    with pytest.raises(UserError) as refusal:
        convert_main(argv)
    assert list(output_parent.iterdir()) == []
    return str(refusal.value)


def test_delta_of_another_model_size_is_refused_naming_file_and_key(tmp_path, output_parent):
    # The tiny analogue of a 7B delta (width 4096) on a 13B LLaMA (width 5120).
    base = write_llama_folder(tmp_path / "llama-wide", llama_state(1000, hidden=80), "safetensors", 1000)
    delta = write_llama_folder(tmp_path / "delta", llama_state(1001), "bin", 1001, {"[PAD]": 1000})
    message = refused(delta_argv(output_parent / "out", base, delta), output_parent)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"--vicuna-delta {delta} (pytorch_model-00001-of-00002.bin): "
                              "key 'model.embed_tokens.weight' has shape [1001, 64], but --llama-base ")
    assert "has [1000, 80] for it" in message and "another model size" in message


def test_delta_missing_a_base_key_is_refused(tmp_path, output_parent):
    state = llama_state(1001)
    del state["model.layers.1.mlp.up_proj.weight"]
    base = write_llama_folder(tmp_path / "llama", llama_state(1000), "safetensors", 1000)
    delta = write_llama_folder(tmp_path / "delta", state, "bin", 1001, {"[PAD]": 1000})
    message = refused(delta_argv(output_parent / "out", base, delta), output_parent)
    assert f"--vicuna-delta {delta} has no key 'model.layers.1.mlp.up_proj.weight'" in message


def test_unreachable_delta_hub_id_is_refused(tmp_path, output_parent, monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("minigpt4_hf.conversion.hf_hub_download", offline)
    base = write_llama_folder(tmp_path / "llama", llama_state(1000), "safetensors", 1000)
    message = refused(delta_argv(output_parent / "out", base, "lmsys/vicuna-7b-delta-v0"), output_parent)
    assert "--vicuna-delta lmsys/vicuna-7b-delta-v0: not a local folder, and fetching it from the Hub failed" in message


@pytest.mark.parametrize("flags", [
    {"--llama-base": "llama", "--vicuna-delta": "delta"},  # together with --llm
    {"--llm": None, "--llama-base": "llama"},  # a base without its delta
])
def test_llm_and_delta_flags_must_come_as_one_or_the_other(tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(fixture_argv(tmp_path / "out", flags))
    assert exit_info.value.code == 2

