from pathlib import Path

from setuptools import find_packages, setup


TRAIN = ["peft>=0.17", "datasets>=4.0", "accelerate>=1.10"]
CONVERT = ["sentencepiece>=0.2", "protobuf>=4"]
# gradio_client (which gradio brings) and psutil drive and measure minigpt4-demo-load-test.
DEMO = ["gradio>=6,<7", "psutil>=5.9"]
DATA = ["datasets>=4.0"]
BENCHMARK = ["matplotlib>=3.8"]
QUANTIZATION = ["bitsandbytes>=0.45", "accelerate>=1.10"]
# minigpt4-evaluate (docs/evaluation.md). lmms-eval itself is not listed: its requirements would replace torch and
# others, so install it first without them, `pip install --no-deps lmms-eval==0.7.3`; these are the packages it needs
# for the runs here (none of them changes an installed version).
EVAL = ["datasets>=4.0", "pycocoevalcap>=1.2", "loguru>=0.7", "sacrebleu>=2.4", "evaluate>=0.4", "tenacity>=8.3",
        "pyyaml>=6"]
ALL = sorted(set(TRAIN + CONVERT + DEMO + DATA + BENCHMARK + EVAL))

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
            "minigpt4-check-transformers = minigpt4_hf.cli.check_transformers_versions:cli",
            "minigpt4-evaluate = minigpt4_hf.cli.evaluate:cli",
        ]
    },
    # What loading a model and generating with it needs (minigpt4-chat, -caption, -quickstart and the library's
    # inference). Importing the three model files never imports the extras below.
    install_requires=[
        "torch>=2.4",
        # The remote code of a converted Hub repo (the three root modules) supports transformers>=4.57,<6: every
        # release from 4.57.0 to 5.24.0 (docs/transformers-versions.md; `minigpt4-check-transformers` checks one).
        # This package's own tools (conversion, training, chat, demo, benchmark) are built on 5.24's API.
        "transformers>=5.24,<6",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "huggingface_hub>=1.0",
        "pillow>=10.0",
        "numpy>=1.26",
        "jinja2>=3.1",  # chat templates, the model card
        "tqdm>=4.66",
    ],
    extras_require={
        # minigpt4-train: the Trainer (accelerate), LoRA (peft), the data sources (datasets).
        "train": TRAIN,
        # minigpt4-convert of checkpoints whose tokenizer ships only as sentencepiece `tokenizer.model`.
        "convert": CONVERT,
        # minigpt4-demo (Gradio 6 chat messages; gradio 6 pins pillow<13).
        "demo": DEMO,
        # minigpt4-build-stage2-data: the exported HF dataset (the refiner talks HTTP with the standard library).
        "data": DATA,
        # minigpt4-benchmark: the PNG of tokens/s against batch size.
        "benchmark": BENCHMARK,
        # minigpt4-evaluate: datasets and the scorers (lmms-eval goes in with --no-deps, see EVAL).
        "eval": EVAL,
        # --load-in-8bit / --load-in-4bit (NVIDIA GPU with CUDA) and --device-map of chat, caption, demo, the builder.
        "quantization": QUANTIZATION,
        # Everything that runs on any machine (the CUDA-only quantization extra is left to `quantization`).
        "all": ALL,
        # The test suite: every extra it exercises, pytest, and Playwright for the browser test of the demo (it drives
        # Debian's chromium: apt-get install chromium).
        "dev": ALL + ["pytest>=8", "pytest-timeout>=2.3", "playwright>=1.40",
                     # tests/test_trl.py fine-tunes with TRL's SFTTrainer (docs/fine-tuning-trl.md).
                     "trl>=1.16"],
    },
)
