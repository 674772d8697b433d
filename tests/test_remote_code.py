"""A saved folder is a Hub repo: it loads with the Auto classes as remote code, with nothing of this package installed."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

from conftest import REPO_ROOT


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    # This package must not be importable: block its three top-level modules.
    for name in ("configuration_minigpt4", "modeling_minigpt4", "processing_minigpt4", "minigpt4_hf"):
        sys.modules[name] = None
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    folder, image_path = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    print(json.dumps({
        "modules": [type(o).__module__ for o in (config, model, base, processor)],
        "classes": [type(o).__name__ for o in (config, model, base, processor)],
        "new_tokens": generated[0, inputs["input_ids"].shape[1]:].tolist(),
    }))
    """
)


def test_saved_folder_holds_code_weights_processor_and_auto_map(tiny_saved_dir):
    files = {path.name for path in tiny_saved_dir.iterdir()}
    assert {"configuration_minigpt4.py", "modeling_minigpt4.py", "processing_minigpt4.py", "model.safetensors",
            "config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
            "chat_template.jinja"} <= files
    auto_map = json.loads((tiny_saved_dir / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    processor_map = json.loads((tiny_saved_dir / "processor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoProcessor": "processing_minigpt4.MiniGPT4Processor"}


def test_fresh_process_without_the_package_loads_the_folder_as_remote_code(tiny_shared, tiny_saved_dir, tmp_path,
                                                                           example_image):
    model, processor = tiny_shared
    image_path = tmp_path / "image.png"
    example_image.save(image_path)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(tiny_saved_dir), str(image_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in report["modules"])
    assert report["classes"] == ["MiniGPT4Config", "MiniGPT4ForConditionalGeneration",
                                 "MiniGPT4ForConditionalGeneration", "MiniGPT4Processor"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=example_image.copy(), text=prompt, return_tensors="pt")
    # The PNG round trip is lossless, so the fresh process saw the same pixels.
    expected = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert report["new_tokens"] == expected[0, inputs["input_ids"].shape[1]:].tolist()


def test_auto_model_gives_the_full_generation_model(tiny_saved_dir):
    model = AutoModel.from_pretrained(tiny_saved_dir, trust_remote_code=True)
    assert type(model).__name__ == "MiniGPT4ForConditionalGeneration"
    assert hasattr(model, "generate")
    assert AutoConfig.from_pretrained(tiny_saved_dir, trust_remote_code=True).model_type == "minigpt4"


def test_image_text_to_text_pipeline_answers_chat_messages_with_an_image(tiny_shared, tiny_saved_dir, example_image):
    model, processor = tiny_shared
    chat = pipeline("image-text-to-text", model=str(tiny_saved_dir), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": example_image},
                                             {"type": "text", "text": "What is it?"}]}]
    output = chat(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])[0]
    assert output[0]["generated_text"] == expected
    assert isinstance(AutoProcessor.from_pretrained(tiny_saved_dir, trust_remote_code=True).image_token_id, int)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """`python scripts/quickstart.py` into a fresh folder, as README line 1 runs it."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "quickstart.py"), "--output-dir",
                             str(tmp_path / "tiny"), "--max-new-tokens", "5"], capture_output=True, text=True,
                            env=env, timeout=300, stdin=subprocess.DEVNULL)
    return result, tmp_path


def test_quickstart_main_job_answers_about_the_bundled_image(quickstart_run):
    result, tmp_path = quickstart_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TINY RANDOMLY INITIALISED" in result.stdout
    assert "Answer (random weights):" in result.stdout
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tiny", "tiny."))], "no staging folder left"
    reloaded = AutoModel.from_pretrained(tmp_path / "tiny", trust_remote_code=True)
    assert type(reloaded).__name__ == "MiniGPT4ForConditionalGeneration"


def test_quickstart_output_has_the_modes_of_any_new_folder_and_file(quickstart_run):
    result, tmp_path = quickstart_run
    assert result.returncode == 0, result.stderr[-3000:]
    umask = os.umask(0)
    os.umask(umask)
    folder = tmp_path / "tiny"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # 0755 under the usual umask, not 0700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path  # 0644, not 0600
