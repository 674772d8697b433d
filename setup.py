from pathlib import Path

from setuptools import find_packages, setup


setup(
    name="minigpt4-hf",
    version="0.1.0",
    description="MiniGPT-4 as a Hugging Face transformers model: load, chat, fine-tune, convert, publish.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    py_modules=["configuration_minigpt4", "modeling_minigpt4", "processing_minigpt4"],
    packages=find_packages(include=["minigpt4_hf", "minigpt4_hf.*"]),
    package_data={"minigpt4_hf": ["assets/*", "assets/tiny_tokenizer/*", "ds_zero2.json"]},
    entry_points={
        "console_scripts": [
            "minigpt4-quickstart = minigpt4_hf.cli.quickstart:cli",
            "minigpt4-convert = minigpt4_hf.cli.convert:cli",
            "minigpt4-train = minigpt4_hf.cli.train:cli",
            "minigpt4-chat = minigpt4_hf.cli.chat:cli",
            "minigpt4-caption = minigpt4_hf.cli.caption:cli",
            "minigpt4-demo = minigpt4_hf.cli.demo:cli",
            "minigpt4-demo-load-test = minigpt4_hf.cli.demo_load_test:cli",
            "minigpt4-build-stage2-data = minigpt4_hf.cli.build_stage2_data:cli",
            "minigpt4-benchmark = minigpt4_hf.cli.benchmark:cli",
            "minigpt4-benchmark-conversion = minigpt4_hf.cli.benchmark_conversion:cli",
        ]
    },
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "huggingface_hub>=1.0",
        "peft>=0.17",
        "datasets>=4.0",
        "accelerate>=1.10",
        "pillow>=10.0",
        "numpy>=1.26",
    ],
    extras_require={
        # Converting original checkpoints whose tokenizer ships only as sentencepiece `tokenizer.model`;
        # jinja2 renders the model card (huggingface_hub's ModelCard.from_template).
        "convert": ["sentencepiece>=0.2", "protobuf>=4", "jinja2>=3.1"],
        # scripts/demo.py (Gradio 6 chat messages). gradio 6 pins pillow<13.
        # (gradio_client, which gradio brings, and psutil drive and measure scripts/demo_load_test.py.)
        "demo": ["gradio>=6,<7", "psutil>=5.9"],
        # --load-in-8bit / --load-in-4bit of scripts/chat.py, caption.py, demo.py (NVIDIA GPU with CUDA).
        "quantization": ["bitsandbytes>=0.45"],
        "benchmark": ["matplotlib>=3.8"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "sentencepiece>=0.2",
            "protobuf>=4",
            # tests/test_demo.py drives the demo in Debian's chromium (apt-get install chromium).
            "gradio>=6,<7",
            "psutil>=5.9",
            "playwright>=1.40",
            # tests/test_benchmark.py runs scripts/benchmark.py, which plots tokens/s against batch size.
            "matplotlib>=3.8",
            # tests/test_trl.py fine-tunes with TRL's SFTTrainer (docs/fine-tuning-trl.md).
            "trl>=1.16",
        ],
    },
)
