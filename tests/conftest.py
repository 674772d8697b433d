"""Shared test fixtures: tiny random MiniGPT-4 models built on the spot, the original-format fixture files."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_TINY = REPO_ROOT / "tests" / "fixtures" / "original_tiny"
# Remote-code modules that tests load go to a throwaway cache, never to ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "minigpt4-test-modules"))
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


def redraw_vision_side_weights(model, seed: int = 0) -> None:
    """
    Draws the weights of the ViT, the Q-Former and the projection again, unit-variance (scaled by fan-in). With their
    usual initialisation (BLIP-2's vision `initializer_range` is 1e-10) a random model gives the same answer whatever
    the image, so tests that must tell images apart by the answers use this instead.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            vision_side = any(part in name for part in ("vision", "qformer", "projection"))
            if isinstance(module, torch.nn.Conv2d) or (isinstance(module, torch.nn.Linear) and vision_side):
                weight = module.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) / weight[0].numel() ** 0.5)


@pytest.fixture(scope="session")
def tiny_seeing():
    """A tiny `(model, processor)` whose answers depend on the image (see `redraw_vision_side_weights`)."""
    model, processor = build_random_model("tiny")
    redraw_vision_side_weights(model)
    return model, processor


@pytest.fixture(scope="session")
def tiny_seeing_dir(tmp_path_factory, tiny_seeing):
    """`tiny_seeing` saved with `save_pretrained`."""
    model, processor = tiny_seeing
    folder = tmp_path_factory.mktemp("tiny_seeing_minigpt4")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def example_image():
    return Image.open(EXAMPLE_IMAGE).convert("RGB")


@pytest.fixture
def chat_messages():
    """One user turn with an image, as chat pipelines pass it."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}
    ]
