"""
minigpt4-convert: original MiniGPT-4 checkpoints -> one folder that loads with the Auto classes.

Numerical parity of the converted model with the original code is in test_parity_original.py; this file covers the
folder, the key mapping, the model card, the Hub upload, the BLIP-2 route, full-size shapes and bad input.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ORIGINAL_TINY, REPO_ROOT
from minigpt4_hf.cli.convert import main as convert_main
from minigpt4_hf.cli.options import UserError
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from minigpt4_hf.benchmark_conversion import QFORMER_POSITION_IDS, qformer_shapes, vit_shapes
from minigpt4_hf.benchmark_conversion import SIZES as ORIGINAL_SIZES
from minigpt4_hf.random_models import EXAMPLE_IMAGE
from minigpt4_hf.model_card import default_base_models, language_model_name
from minigpt4_hf.conversion import (
    KINDS,
    ConversionError,
    InputFile,
    check_against_model,
    derive_config,
    expected_model_shapes,
    plan_conversion,
    text_config_dict,
)
from safetensors import safe_open
from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration
from transformers import LlamaConfig, LlamaForCausalLM

from configuration_minigpt4 import MiniGPT4Config
from processing_minigpt4 import stop_token_ids_for


WEIGHTS = ORIGINAL_TINY / "weights"
OVERRIDES = REPO_ROOT / "tests" / "fixtures" / "original_tiny_overrides.json"
SCRIPT = REPO_ROOT / "scripts" / "convert_original_checkpoint.py"
INPUTS = {
    "--vit-checkpoint": WEIGHTS / "eva_vit_g.pth",
    "--qformer-checkpoint": WEIGHTS / "blip2_pretrained_flant5xxl.pth",
    "--llm": WEIGHTS / "vicuna_tiny",
    "--projection-checkpoint": WEIGHTS / "pretrained_minigpt4.pth",
    "--config-overrides": OVERRIDES,
}


def fixture_argv(output_dir, replace: dict | None = None, extra: tuple = ()) -> list[str]:
    """The converter's arguments for the tiny original-format fixture; `replace` swaps (or, with None, drops) flags."""
    flags = {**INPUTS, "--output-dir": output_dir, **(replace or {})}
    argv = [item for flag, value in flags.items() if value is not None for item in (flag, str(value))]
    return argv + list(extra)


def load_source(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def edited_checkpoint(tmp_path, source, name: str, edit) -> str:
    """A copy of an original-format checkpoint with `edit(checkpoint)` applied."""
    checkpoint = load_source(source)
    edit(checkpoint)
    path = tmp_path / name
    torch.save(checkpoint, path)
    return str(path)


def copied_llm_folder(tmp_path):
    folder = tmp_path / "vicuna_copy"
    shutil.copytree(WEIGHTS / "vicuna_tiny", folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The output folder (converted once, from the command line, with the defaults: float16, sharded here).


@pytest.fixture(scope="module")
def command_line_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("convert") / "minigpt4-tiny"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *fixture_argv(output_dir, extra=("--max-shard-size", "300KB"))],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    return completed, output_dir


@pytest.fixture(scope="module")
def converted(command_line_run):
    completed, output_dir = command_line_run
    assert completed.returncode == 0, completed.stderr
    return output_dir


def test_command_line_run_exits_zero_and_reports_what_it_did(command_line_run):
    completed, output_dir = command_line_run
    assert completed.returncode == 0, completed.stderr
    assert f"Saved to {output_dir}" in completed.stdout


def test_output_folder_holds_config_weights_processor_code_and_card(converted):
    names = {path.name for path in converted.iterdir()}
    expected = {
        "config.json", "generation_config.json", "model.safetensors.index.json", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "configuration_minigpt4.py",
        "modeling_minigpt4.py", "processing_minigpt4.py", "README.md",
    }
    assert expected <= names
    shards = sorted(name for name in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name))
    assert len(shards) > 1  # --max-shard-size 300KB
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not any(name.startswith(".") for name in names)


def test_config_has_auto_map_and_sizes_read_from_shapes(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_minigpt4.MiniGPT4ForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_minigpt4.MiniGPT4Config"
    vision, qformer, text = config["vision_config"], config["qformer_config"], config["text_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["patch_size"], vision["image_size"]) == (
        56, 2, 14, 56
    )
    assert vision["intermediate_size"] == 244 and vision["qkv_bias"] is True
    assert (qformer["hidden_size"], qformer["num_hidden_layers"], qformer["intermediate_size"]) == (48, 2, 192)
    assert qformer["cross_attention_frequency"] == 2 and qformer["encoder_hidden_size"] == 56
    assert config["num_query_tokens"] == 6
    assert (text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]) == (64, 1000, 2)
    # Not readable from shapes: from --config-overrides.
    assert vision["num_attention_heads"] == 4 and qformer["num_attention_heads"] == 4
    assert config["vision_layernorm_eps"] == 1e-5  # ln_vision's eps, not the ViT's 1e-6
    assert config["dtype"] == "float16"


def test_generation_config_holds_original_chat_defaults(converted):
    generation = json.loads((converted / "generation_config.json").read_text())
    assert {key: generation[key] for key in (
        "max_new_tokens", "num_beams", "do_sample", "top_p", "temperature", "repetition_penalty", "min_length"
    )} == {"max_new_tokens": 300, "num_beams": 1, "do_sample": True, "top_p": 0.9, "temperature": 1.0,
           "repetition_penalty": 1.0, "min_length": 1}
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_weights_are_float16_except_qformer_and_query_tokens(converted):
    dtypes = {(key.removeprefix("model.").split(".")[0], tensor.dtype)
              for key, tensor in saved_tensors(converted).items()}
    assert dtypes == {
        ("vision_model", torch.float16), ("qformer", torch.float32), ("query_tokens", torch.float32),
        ("language_projection", torch.float16), ("language_model", torch.float16), ("lm_head", torch.float16),
    }


def test_vit_q_and_v_biases_become_qkv_bias_with_zero_key_part(converted):
    vit = load_source(WEIGHTS / "eva_vit_g.pth")
    saved = saved_tensors(converted)
    for layer in range(2):
        expected = torch.cat([vit[f"blocks.{layer}.attn.q_bias"], torch.zeros(56), vit[f"blocks.{layer}.attn.v_bias"]])
        assert torch.equal(saved[f"model.vision_model.encoder.layers.{layer}.self_attn.qkv.bias"], expected.half())


def test_ln_vision_becomes_vision_post_layernorm(converted):
    blip2 = load_source(WEIGHTS / "blip2_pretrained_flant5xxl.pth")["model"]
    saved = saved_tensors(converted)
    for param in ("weight", "bias"):
        assert torch.equal(saved[f"model.vision_model.post_layernorm.{param}"], blip2[f"ln_vision.{param}"].half())


def test_qformer_self_attention_is_renamed_and_kept_in_float32(converted):
    blip2 = load_source(WEIGHTS / "blip2_pretrained_flant5xxl.pth")["model"]
    saved = saved_tensors(converted)
    assert torch.equal(
        saved["model.qformer.encoder.layer.0.attention.attention.query.weight"],
        blip2["Qformer.bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert torch.equal(
        saved["model.qformer.encoder.layer.0.crossattention.attention.key.weight"],
        blip2["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
    )
    assert torch.equal(saved["model.qformer.layernorm.weight"], blip2["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(saved["model.query_tokens"], blip2["query_tokens"])


def test_llama_proj_becomes_language_projection(converted):
    projection = load_source(WEIGHTS / "pretrained_minigpt4.pth")["model"]
    saved = saved_tensors(converted)
    assert torch.equal(saved["model.language_projection.weight"], projection["llama_proj.weight"].half())
    assert torch.equal(saved["model.language_projection.bias"], projection["llama_proj.bias"].half())


def test_language_model_goes_under_model_language_model_and_its_head_to_lm_head(converted):
    llm = load_source(WEIGHTS / "vicuna_tiny" / "pytorch_model.bin")
    saved = saved_tensors(converted)
    assert torch.equal(saved["model.language_model.embed_tokens.weight"], llm["model.embed_tokens.weight"].half())
    assert torch.equal(saved["lm_head.weight"], llm["lm_head.weight"].half())
    assert not any("rotary_emb" in key for key in saved)
    config = json.loads((converted / "config.json").read_text())
    assert config["image_token_id"] == 1000  # just past the 1000-token vocabulary: the embedding keeps 1000 rows


def test_sentencepiece_only_tokenizer_becomes_fast_tokenizer_json(converted):
    assert (WEIGHTS / "vicuna_tiny" / "tokenizer.model").exists()
    assert not (WEIGHTS / "vicuna_tiny" / "tokenizer.json").exists()
    assert not (converted / "tokenizer.model").exists()
    assert (converted / "tokenizer.json").exists()
    assert AutoTokenizer.from_pretrained(converted).is_fast  # its ids: test_parity_original.py


def test_config_holds_the_stop_sequences_of_the_saved_tokenizer(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["stop_token_ids"] == stop_token_ids_for(AutoTokenizer.from_pretrained(converted))


# ---------------------------------------------------------------------------------------------------------------------
# The model card.


def test_model_card_metadata(converted):
    card = ModelCard.load(converted / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "transformers"
    assert card.data.license == "other" and "non-commercial" in card.data.license_name
    assert {"minigpt4", "custom_code"} <= set(card.data.tags)


def test_model_card_records_sha256_of_every_input_file(converted):
    text = (converted / "README.md").read_text()
    inputs = [INPUTS[flag] for flag in ("--vit-checkpoint", "--qformer-checkpoint", "--projection-checkpoint")]
    inputs += sorted((WEIGHTS / "vicuna_tiny").iterdir())
    for path in inputs:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"| `{path.name}` | {path.stat().st_size} | `{digest}` |" in text


def test_model_card_states_architecture_parity_and_limitations(converted):
    text = (converted / "README.md").read_text()
    for heading in ("## Usage", "## Architecture", "## Provenance", "## Parity with the original", "## Limitations"):
        assert heading in text
    assert "Linear 48 -> 64" in text  # llama_proj, from the shapes
    for limitation in ("Hallucination", "Vicuna version", "Repetition penalty"):
        assert f"**{limitation}.**" in text


def test_model_card_usage_snippet_runs_against_the_folder(converted):
    text = (converted / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'model_id = "{converted}"' in code
    code = code.replace('image_path = "example.jpg"', f'image_path = "{EXAMPLE_IMAGE}"')
    code = code.replace("max_new_tokens=300", "max_new_tokens=12")  # 300 float16 steps take ~40 s on a CPU
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["answer"], str)
    assert namespace["generated_ids"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    model = namespace["model"]
    assert model.language_model.dtype == torch.float16 and model.qformer.layernorm.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Conversion behaviours (in process, through main(argv)).


def test_vit_blocks_beyond_configured_depth_are_dropped_with_one_line(tmp_path, capsys):
    def add_block(vit):
        vit.update({key.replace("blocks.1.", "blocks.2."): value.clone() for key, value in vit.items()
                    if key.startswith("blocks.1.")})
    vit = edited_checkpoint(tmp_path, INPUTS["--vit-checkpoint"], "eva_vit_g_3_blocks.pth", add_block)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({**json.loads(OVERRIDES.read_text()),
                                     "vision_config": {"num_attention_heads": 4, "num_hidden_layers": 2}}))
    output_dir = tmp_path / "out"
    assert convert_main(fixture_argv(output_dir, {"--vit-checkpoint": vit, "--config-overrides": overrides})) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "dropping" in line]
    assert lines == [f"--vit-checkpoint {vit} holds 3 ViT blocks; the model uses the first 2: dropping block 2, "
                     "as the original did."]
    assert json.loads((output_dir / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2
    assert not any(key.startswith("model.vision_model.encoder.layers.2.") for key in saved_tensors(output_dir))


def test_keys_the_original_ignored_are_listed_not_loaded(tmp_path, capsys):
    def add_optimizer_state(checkpoint):
        checkpoint.update(optimizer={"state": {}, "param_groups": []}, epoch=3)
    projection = edited_checkpoint(tmp_path, INPUTS["--projection-checkpoint"], "with_optimizer.pth",
                                   add_optimizer_state)
    output_dir = tmp_path / "out"
    assert convert_main(fixture_argv(output_dir, {"--projection-checkpoint": projection})) == 0
    report = capsys.readouterr().out
    assert "t5_proj.weight, t5_proj.bias" in report
    assert "Qformer.bert.embeddings.position_ids" in report
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in report
    assert f"--projection-checkpoint {projection}: not loaded" in report and "optimizer, epoch" in report
    assert not any("t5_proj" in key or "position_ids" in key for key in saved_tensors(output_dir))


def test_overwrite_replaces_an_existing_output_folder(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "stale.txt").write_text("old")
    assert convert_main(fixture_argv(output_dir, extra=("--overwrite-output-dir",))) == 0
    assert not (output_dir / "stale.txt").exists() and (output_dir / "config.json").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def llm_folder_with_one_more_embedding_row(tmp_path):
    """A copy of the fixture's LLM folder whose embedding and head have one more row (as Vicuna v0's 32001)."""
    llm = copied_llm_folder(tmp_path)
    state = load_source(llm / "pytorch_model.bin")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.zeros(1, 64)])
    (llm / "pytorch_model.bin").unlink()
    torch.save(state, llm / "pytorch_model.bin")
    return llm


def test_vicuna_v0_tokenizer_with_added_pad_token_converts(tmp_path):
    # Vicuna v0 = LLaMA's vocabulary + '[PAD]': the embedding has one more row, the tokenizer one added token.
    llm = llm_folder_with_one_more_embedding_row(tmp_path)
    (llm / "added_tokens.json").write_text(json.dumps({"[PAD]": 1000}))
    output_dir = tmp_path / "out"
    assert convert_main(fixture_argv(output_dir, {"--llm": llm})) == 0
    config = json.loads((output_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 1001 and config["image_token_id"] == 1001


def test_push_to_hub_creates_the_repo_and_uploads_the_finished_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.append(("create", repo_id, kwargs)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: calls.append(("upload", kwargs)))
    output_dir = tmp_path / "out"
    assert convert_main(fixture_argv(output_dir, extra=("--push-to-hub", "someone/minigpt4-tiny", "--private"))) == 0
    assert calls[0] == ("create", "someone/minigpt4-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][0] == "upload"
    assert calls[1][1]["repo_id"] == "someone/minigpt4-tiny" and calls[1][1]["folder_path"] == output_dir
    assert 'model_id = "someone/minigpt4-tiny"' in (output_dir / "README.md").read_text()


def test_failed_upload_is_reported_and_the_finished_folder_kept(tmp_path, monkeypatch, capsys):
    def refuse(self, repo_id, **kwargs):
        raise PermissionError("no write access")
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    output_dir = tmp_path / "out"
    assert convert_main(fixture_argv(output_dir, extra=("--push-to-hub", "someone/minigpt4-tiny"))) == 1
    assert "the upload failed (PermissionError: no write access)" in capsys.readouterr().err
    assert (output_dir / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --blip2: the ViT, ln_vision, Q-Former and query tokens from a transformers BLIP-2 checkpoint.


def tiny_blip2(converted_tiny_dir, vocab_size: int = 99) -> Blip2ForConditionalGeneration:
    """A tiny BLIP-2 (OPT language model) whose vision side holds the fixture's weights (ln_vision = post_layernorm)."""
    config = Blip2Config(
        vision_config={"image_size": 56, "patch_size": 14, "hidden_size": 56, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 244},
        qformer_config={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 192},
        text_config={"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "ffn_dim": 37, "vocab_size": vocab_size, "word_embed_proj_dim": 32},
        num_query_tokens=6,
    )
    blip2 = Blip2ForConditionalGeneration(config)
    vision_side = {key.removeprefix("model."): value for key, value in saved_tensors(converted_tiny_dir).items()
                   if key.startswith(("model.vision_model.", "model.qformer.", "model.query_tokens"))}
    assert blip2.load_state_dict(vision_side, strict=False).unexpected_keys == []
    return blip2


def test_blip2_folder_gives_the_same_weights_as_the_lavis_files(tmp_path, converted_tiny_dir):
    blip2_dir = tmp_path / "blip2-tiny"
    tiny_blip2(converted_tiny_dir).save_pretrained(blip2_dir)
    output_dir = tmp_path / "out"
    argv = fixture_argv(output_dir, {"--vit-checkpoint": None, "--qformer-checkpoint": None,
                                     "--config-overrides": None, "--blip2": blip2_dir}, extra=("--dtype", "float32"))
    assert convert_main(argv) == 0  # head counts come from the BLIP-2 config: no overrides needed
    reference, converted = saved_tensors(converted_tiny_dir), saved_tensors(output_dir)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[key], reference[key]) for key in reference)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["vision_layernorm_eps"] == 1e-5  # BLIP-2's post_layernorm is ln_vision, with the original eps


def test_blip2_hub_id_downloads_only_the_vision_and_qformer_shards(tmp_path, converted_tiny_dir, monkeypatch):
    hub_dir, snapshot = tmp_path / "hub", tmp_path / "snapshot"
    tiny_blip2(converted_tiny_dir, vocab_size=4000).save_pretrained(hub_dir, max_shard_size="200KB")
    snapshot.mkdir()
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "someone/blip2-tiny"
        requested.append(filename)
        if not (hub_dir / filename).exists():
            raise EntryNotFoundError(filename)
        shutil.copy(hub_dir / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr("minigpt4_hf.conversion.hf_hub_download", fake_download)
    output_dir = tmp_path / "out"
    argv = fixture_argv(output_dir, {"--vit-checkpoint": None, "--qformer-checkpoint": None,
                                     "--config-overrides": None, "--blip2": "someone/blip2-tiny"},
                        extra=("--dtype", "float32"))
    assert convert_main(argv) == 0
    weight_map = json.loads((hub_dir / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {name for key, name in weight_map.items() if key.startswith(("vision_model.", "qformer.", "query"))}
    assert set(weight_map.values()) - needed  # some shards hold only BLIP-2's own language model ...
    assert set(requested) - {"config.json", "model.safetensors.index.json"} == needed  # ... and are not fetched
    assert saved_tensors(output_dir).keys() == saved_tensors(converted_tiny_dir).keys()
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model == ["someone/blip2-tiny"]


# ---------------------------------------------------------------------------------------------------------------------
# Full-size shapes, without full-size weights: the original key sets as meta tensors.


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def original_eva_vit_g() -> dict[str, torch.Tensor]:
    """The keys and shapes of eva_vit_g.pth (facts sheet §2.1): 40 blocks, of which MiniGPT-4 uses 39."""
    return {key: meta(*shape) for key, shape in vit_shapes(ORIGINAL_SIZES["7b"]).items()}


def original_blip2_flant5xxl() -> dict[str, torch.Tensor]:
    """The keys and shapes of blip2_pretrained_flant5xxl.pth's "model" (facts sheet §2.2)."""
    return {key: meta(*shape, dtype=torch.int64 if key == QFORMER_POSITION_IDS else torch.float32)
            for key, shape in qformer_shapes(ORIGINAL_SIZES["7b"]).items()}


VICUNA_V0_SIZES = {  # LLaMA-7B / 13B with Vicuna v0's 32001-token vocabulary
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008},
    "13b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13824},
}


def vicuna_v0(size: str) -> tuple[dict, LlamaConfig]:
    """The state dict (meta tensors, with the rotary buffers transformers 4.x saved) and config of Vicuna v0."""
    config = LlamaConfig(vocab_size=32001, **VICUNA_V0_SIZES[size])
    with torch.device("meta"):
        state = dict(LlamaForCausalLM(config).state_dict())
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = meta(64)
    return state, config


def full_size_plan(size: str, projection_width: int | None = None):
    llm_state, llm_config = vicuna_v0(size)
    width = projection_width or llm_config.hidden_size
    inputs = [
        InputFile.from_state_dict(KINDS["vit"], original_eva_vit_g(), "--vit-checkpoint eva_vit_g.pth"),
        InputFile.from_state_dict(KINDS["qformer"], original_blip2_flant5xxl(),
                                  "--qformer-checkpoint blip2_pretrained_flant5xxl.pth"),
        InputFile.from_state_dict(KINDS["projection"], {"llama_proj.weight": meta(width, 768),
                                                        "llama_proj.bias": meta(width)},
                                  "--projection-checkpoint pretrained_minigpt4.pth"),
        InputFile.from_state_dict(KINDS["llm"], llm_state, "--llm vicuna"),
    ]
    return plan_conversion(inputs), text_config_dict(llm_config)


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_full_size_original_keys_cover_the_default_config_with_matching_shapes(size):
    plan, text_config = full_size_plan(size)
    config = derive_config(plan, text_config, overrides={})  # no overrides: the real sizes are the defaults
    default = MiniGPT4Config(text_config={**text_config, "model_type": "llama"})
    for part in ("vision_config", "qformer_config"):
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            assert getattr(getattr(config, part), field) == getattr(getattr(default, part), field), (part, field)
    assert config.vision_config.image_size == 224 and config.num_query_tokens == 32
    assert config.qformer_config.cross_attention_frequency == 2
    expected = expected_model_shapes(default)
    assert {name: target.shape for name, target in plan.tensors.items()} == expected
    assert check_against_model(plan, config) == list(expected)
    assert any(what == "ViT block 39" for _, what, _ in plan.ignored)  # the 40th block is dropped


@pytest.mark.parametrize("size, vicuna", [("7b", "lmsys/vicuna-7b-delta-v0"), ("13b", "lmsys/vicuna-13b-delta-v0")])
def test_model_card_names_the_base_models_of_full_size_shapes(size, vicuna):
    plan, text_config = full_size_plan(size)
    config = derive_config(plan, text_config, overrides={})
    assert default_base_models(config) == ["Salesforce/blip2-flan-t5-xxl", vicuna]
    assert language_model_name(config) == f"Vicuna-{size.upper()} v0"


def test_full_size_13b_projection_with_7b_vicuna_is_refused():
    plan, text_config = full_size_plan("7b", projection_width=5120)
    with pytest.raises(ConversionError, match=r"maps to width 5120, but the language model in --llm has hidden size "
                                              r"4096.*another Vicuna size"):
        derive_config(plan, text_config, overrides={})


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear message naming file and key (a UserError: exit status 2), nothing left in the output's parent
# folder.


@pytest.fixture
def output_parent(tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


def assert_refused(argv, output_parent, *fragments) -> str:
    with pytest.raises(UserError) as refusal:
        convert_main(argv)
    message = str(refusal.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    assert list(output_parent.iterdir()) == []  # no output folder, no temporary folder
    return message


def test_missing_file_is_refused(output_parent, tmp_path):
    missing = tmp_path / "eva_vit_g.pth"
    assert_refused(fixture_argv(output_parent / "out", {"--vit-checkpoint": missing}), output_parent,
                   f"--vit-checkpoint {missing}: no such file.")


def test_unreadable_file_is_refused(output_parent, tmp_path):
    garbage = tmp_path / "blip2_pretrained_flant5xxl.pth"
    garbage.write_bytes(b"<html>not a checkpoint</html>")
    assert_refused(fixture_argv(output_parent / "out", {"--qformer-checkpoint": garbage}), output_parent,
                   f"--qformer-checkpoint {garbage}: cannot be read as a PyTorch checkpoint")


def test_file_of_the_wrong_kind_is_refused_with_what_it_looks_like(output_parent):
    vit = INPUTS["--vit-checkpoint"]
    assert_refused(fixture_argv(output_parent / "out", {"--qformer-checkpoint": vit}), output_parent,
                   f"--qformer-checkpoint {vit} is not a BLIP-2 checkpoint",
                   "It looks like an EVA ViT checkpoint", "pass it as --vit-checkpoint")


def test_missing_vit_key_is_refused_naming_file_and_key(output_parent, tmp_path):
    vit = edited_checkpoint(tmp_path, INPUTS["--vit-checkpoint"], "eva_vit_g.pth",
                            lambda state: state.pop("blocks.1.attn.v_bias"))
    assert_refused(fixture_argv(output_parent / "out", {"--vit-checkpoint": vit}), output_parent,
                   f"--vit-checkpoint {vit} has no key 'blocks.1.attn.v_bias' "
                   "(needed for 'model.vision_model.encoder.layers.1.self_attn.qkv.bias')")


def test_missing_qformer_key_is_refused_naming_file_and_key(output_parent, tmp_path):
    key = "Qformer.bert.encoder.layer.1.attention.self.value.weight"
    blip2 = edited_checkpoint(tmp_path, INPUTS["--qformer-checkpoint"], "blip2.pth",
                              lambda checkpoint: checkpoint["model"].pop(key))
    assert_refused(fixture_argv(output_parent / "out", {"--qformer-checkpoint": blip2}), output_parent,
                   f"--qformer-checkpoint {blip2} has no key '{key}' "
                   "(needed for 'model.qformer.encoder.layer.1.attention.attention.value.weight')")


def test_projection_of_another_width_than_the_language_model_is_refused(output_parent, tmp_path):
    # The tiny analogue of a 13B projection (5120) with a 7B Vicuna (4096).
    def widen(checkpoint):
        checkpoint["model"] = {"llama_proj.weight": torch.zeros(80, 48), "llama_proj.bias": torch.zeros(80)}
    projection = edited_checkpoint(tmp_path, INPUTS["--projection-checkpoint"], "proj.pth", widen)
    assert_refused(fixture_argv(output_parent / "out", {"--projection-checkpoint": projection}), output_parent,
                   f"'llama_proj.weight' in --projection-checkpoint {projection} has shape [80, 48]",
                   "maps to width 80, but the language model in --llm has hidden size 64")


def test_tokenizer_that_does_not_fit_the_embedding_rows_is_refused(output_parent, tmp_path):
    # The tiny analogue of Vicuna v0 weights (32001 rows) with a v1.1 / LLaMA tokenizer (32000 tokens).
    llm = llm_folder_with_one_more_embedding_row(tmp_path)
    assert_refused(fixture_argv(output_parent / "out", {"--llm": llm}), output_parent,
                   f"--llm {llm}: the tokenizer has 1000 tokens but the embedding ('model.embed_tokens.weight' in "
                   f"--llm {llm} (pytorch_model.bin)) has 1001 rows", "Vicuna v0", "32001")


def test_existing_output_folder_is_refused_without_overwrite(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--output-dir {output_dir} exists; pass --overwrite-output-dir to replace"):
        convert_main(fixture_argv(output_dir))
    assert [path.name for path in output_dir.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_head_counts_that_do_not_divide_the_width_ask_for_overrides(output_parent):
    assert_refused(fixture_argv(output_parent / "out", {"--config-overrides": None}), output_parent,
                   "The vision width 56 is not divisible by 16 attention heads",
                   'pass --config-overrides with {"vision_config": {"num_attention_heads": N}}')


def test_unknown_override_field_is_refused(output_parent, tmp_path):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"vision": {"num_attention_heads": 4}}))
    assert_refused(fixture_argv(output_parent / "out", {"--config-overrides": overrides}), output_parent,
                   f"--config-overrides {overrides}: unknown MiniGPT4Config field(s) ['vision']")


def test_failure_while_writing_leaves_no_output_folder(output_parent, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr("minigpt4_hf.converter.save_sharded_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_main(fixture_argv(output_parent / "out"))
    assert list(output_parent.iterdir()) == []


def test_blip2_together_with_lavis_files_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(fixture_argv(tmp_path / "out", {"--blip2": tmp_path}))
    assert exit_info.value.code == 2
