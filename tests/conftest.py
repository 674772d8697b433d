"""Shared test fixtures: tiny random MiniGPT-4 models built on the spot, the original-format fixture files."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_TINY = REPO_ROOT / "tests" / "fixtures" / "original_tiny"
# Remote-code modules that tests load go to a throwaway cache, never to ~/.cache; nothing asks the Hub (a Hub id that
# does not exist fails at once instead of after network retries).
os.environ.setdefault("HF_MODULES_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "minigpt4-test-modules"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from minigpt4_hf.random_models import EXAMPLE_IMAGE, build_random_model  # noqa: E402


@pytest.fixture
def tiny():
    """A fresh tiny random `(model, processor)` (sizes of tests/fixtures/original_tiny), safe to modify."""
    return build_random_model("tiny")


@pytest.fixture(scope="session")
def tiny_shared():
    """A tiny `(model, processor)` shared by the session: do not modify it."""
    return build_random_model("tiny")


@pytest.fixture(scope="session")
def tiny_saved_dir(tmp_path_factory, tiny_shared):
    """A folder holding the shared tiny model and processor as `save_pretrained` writes them."""
    model, processor = tiny_shared
    folder = tmp_path_factory.mktemp("tiny_minigpt4")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def converted_original_tiny(tmp_path_factory):
    """tests/fixtures/original_tiny converted with minigpt4-convert in float32 (parity checks, the BLIP-2 route)."""
    from minigpt4_hf.cli.convert import main as convert_main

    weights = ORIGINAL_TINY / "weights"
    output_dir = tmp_path_factory.mktemp("original_tiny_converted") / "minigpt4-original-tiny"
    exit_code = convert_main([
        "--vit-checkpoint", str(weights / "eva_vit_g.pth"),
        "--qformer-checkpoint", str(weights / "blip2_pretrained_flant5xxl.pth"),
        "--llm", str(weights / "vicuna_tiny"),
        "--projection-checkpoint", str(weights / "pretrained_minigpt4.pth"),
        "--config-overrides", str(REPO_ROOT / "tests" / "fixtures" / "original_tiny_overrides.json"),
        "--dtype", "float32",
        "--output-dir", str(output_dir),
    ])
    assert exit_code == 0
    return output_dir


@pytest.fixture
def example_image():
    return Image.open(EXAMPLE_IMAGE).convert("RGB")


@pytest.fixture
def chat_messages():
    """One user turn with an image, as chat pipelines pass it."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}
    ]
