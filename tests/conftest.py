"""Shared test fixtures: tiny random MiniGPT-4 models built on the spot, the original-format fixture files."""

import io
import os
import struct
import zlib
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


def saved_folder(tmp_path_factory, name: str, model, processor) -> Path:
    """A new temporary folder `name*` holding `model` and `processor` as `save_pretrained` writes them."""
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


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
    return saved_folder(tmp_path_factory, "tiny_minigpt4", *tiny_shared)


@pytest.fixture(scope="session")
def tiny_v2_saved_dir(tmp_path_factory):
    """A tiny random MiniGPT-v2 (task identifiers, grounding) saved with `save_pretrained`: do not modify it."""
    return saved_folder(tmp_path_factory, "tiny_v2", *build_random_model("tiny", variant="v2"))


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
    return saved_folder(tmp_path_factory, "tiny_seeing_minigpt4", *tiny_seeing)


@pytest.fixture(scope="session")
def converted_tiny_dir(tmp_path_factory):
    """tests/fixtures/original_tiny converted by the converter (float32): a Hub-style folder. Do not modify it."""
    from minigpt4_hf.cli.convert import main as convert_main

    weights = ORIGINAL_TINY / "weights"
    output_dir = tmp_path_factory.mktemp("converted") / "minigpt4-original-tiny"
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


def write_image_bomb(path, side: int = 20_000) -> None:
    """
    Writes a valid 1-bit black image of `side` x `side` pixels (400 megapixels at 20,000) that takes a few tens of
    kilobytes on disk (a decompression bomb), without ever holding the pixels in memory: a PNG, or a TIFF (which
    browsers do not try to preview) when `path` ends in `.tiff`.
    """
    row_bytes = (side + 7) // 8
    tiff = str(path).endswith(".tiff")
    row = b"\0" * (row_bytes if tiff else 1 + row_bytes)  # PNG rows start with a filter byte
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    if tiff:  # little-endian TIFF, one Deflate-compressed strip, BlackIsZero
        tags = [(256, 4, side), (257, 4, side), (258, 3, 1), (259, 3, 8), (262, 3, 1), (273, 4, 8),
                (277, 3, 1), (278, 4, side), (279, 4, len(pixels))]
        directory = struct.pack("<H", len(tags)) + b"".join(
            struct.pack("<HHI", tag, kind, 1) + struct.pack("<I" if kind == 4 else "<HH", value, *([0] * (kind == 3)))
            for tag, kind, value in tags
        ) + struct.pack("<I", 0)
        Path(path).write_bytes(b"II*\0" + struct.pack("<I", 8 + len(pixels)) + pixels + directory)
        return

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def write_truncated_png(path) -> None:
    """Writes the first half of a 64 x 64 PNG (a download cut short)."""
    buffer = io.BytesIO()
    pixels = torch.arange(64 * 64 * 3, dtype=torch.int32).remainder(256).to(torch.uint8).reshape(64, 64, 3)
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
