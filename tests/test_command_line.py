"""
The command-line convention of every minigpt4-* tool (docs/command-line.md): console entry points, a fast `--help`
with every default, underscore spellings, the same flags everywhere, and bad input refused with one line and exit
status 2 before anything is loaded or written.
"""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import REPO_ROOT
from minigpt4_hf.cli import build_stage2_data, caption, chat, convert, demo, evaluate, quickstart, train
from minigpt4_hf.cli import benchmark as benchmark_cli
from minigpt4_hf.cli import benchmark_conversion, check_transformers_versions, demo_load_test
from minigpt4_hf.random_models import EXAMPLE_IMAGE


TOOLS = {  # console entry point -> module in minigpt4_hf.cli
    "minigpt4-quickstart": "quickstart",
    "minigpt4-convert": "convert",
    "minigpt4-train": "train",
    "minigpt4-chat": "chat",
    "minigpt4-caption": "caption",
    "minigpt4-demo": "demo",
    "minigpt4-build-stage2-data": "build_stage2_data",
    "minigpt4-benchmark": "benchmark",
    "minigpt4-evaluate": "evaluate",
    "minigpt4-demo-load-test": "demo_load_test",
    "minigpt4-benchmark-conversion": "benchmark_conversion",
    "minigpt4-check-transformers": "check_transformers_versions",
}
MAINS = {"minigpt4-quickstart": quickstart.main, "minigpt4-convert": convert.main, "minigpt4-train": train.main,
         "minigpt4-chat": chat.main, "minigpt4-caption": caption.main, "minigpt4-demo": demo.main,
         "minigpt4-build-stage2-data": build_stage2_data.main, "minigpt4-benchmark": benchmark_cli.main,
         "minigpt4-evaluate": evaluate.main, "minigpt4-demo-load-test": demo_load_test.main,
         "minigpt4-benchmark-conversion": benchmark_conversion.main,
         "minigpt4-check-transformers": check_transformers_versions.main}
HEAVY_PACKAGES = ("torch", "transformers", "datasets", "gradio", "peft", "accelerate")
HELP_PROBE = """
import runpy, sys
sys.argv = [{tool!r}, "--help"]
try:
    runpy.run_module("minigpt4_hf.cli.{module}", run_name="__main__")
except SystemExit as exit:
    print("EXIT", exit.code, file=sys.stderr)
print("IMPORTED", *sorted(name for name in {heavy!r} if name in sys.modules), file=sys.stderr)
"""


def run_python(args: list[str], cwd) -> subprocess.CompletedProcess:
    """Python with this checkout importable, from `cwd` (a folder outside the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def flag_entries(text: str) -> dict[str, str]:
    """`--flag` -> its whole entry in a help text (the invocation and the help, over however many lines)."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if match:
            current = match.group(2)
            entries[current] = line
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def help_text(tool: str, capsys, monkeypatch) -> str:
    """`TOOL --help` as printed (one line per flag: a wide terminal)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        MAINS[tool](["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def snapshot(folder) -> dict:
    """Every path below `folder` with its size (what a refused command must leave as it was)."""
    return {str(path.relative_to(folder)): path.stat().st_size if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------------------
# Entry points and --help.


def test_every_tool_is_a_console_entry_point_and_a_scripts_launcher():
    setup = (REPO_ROOT / "setup.py").read_text()
    declared = dict(re.findall(r'"(minigpt4-[\w-]+) = minigpt4_hf\.cli\.(\w+):cli"', setup))
    assert declared == TOOLS
    launched = {re.search(r"from minigpt4_hf\.cli\.(\w+) import cli", path.read_text()).group(1)
                for path in (REPO_ROOT / "scripts").glob("*.py")}
    assert launched == set(TOOLS.values())


def test_the_command_line_docs_list_every_tool_with_its_launcher():
    page = (REPO_ROOT / "docs" / "command-line.md").read_text()
    listed = dict(re.findall(r"^\| `(minigpt4-[\w-]+)` \| `python scripts/(\w+)\.py` \|", page, flags=re.MULTILINE))
    assert set(listed) == set(TOOLS)
    for tool, launcher in listed.items():
        launcher_code = (REPO_ROOT / "scripts" / f"{launcher}.py").read_text()
        assert f"from minigpt4_hf.cli.{TOOLS[tool]} import cli" in launcher_code


@pytest.mark.parametrize("tool", TOOLS)
def test_help_answers_without_importing_torch(tool, tmp_path):
    probe = HELP_PROBE.format(tool=tool, module=TOOLS[tool], heavy=HEAVY_PACKAGES)
    result = run_python(["-c", probe], cwd=tmp_path)
    assert result.stdout.startswith(f"usage: {tool} "), result.stderr
    assert "EXIT 0" in result.stderr
    assert "IMPORTED\n" in result.stderr, result.stderr  # none of HEAVY_PACKAGES


@pytest.mark.parametrize("tool", TOOLS)
def test_help_gives_every_optional_flag_its_default(tool, capsys, monkeypatch):
    text = help_text(tool, capsys, monkeypatch)
    usage = text.split("\n\n", 1)[0]
    optional = set(re.findall(r"\[(--[\w-]+)", usage)) - {"--help", "--help-trainer"}
    entries = flag_entries(text)
    assert optional and optional <= set(entries)
    for flag in optional:
        assert "(default" in entries[flag], entries[flag]


@pytest.mark.parametrize("tool", ["minigpt4-chat", "minigpt4-caption", "minigpt4-demo", "minigpt4-demo-load-test",
                                  "minigpt4-evaluate", "minigpt4-build-stage2-data", "minigpt4-train",
                                  "minigpt4-convert"])
def test_dtype_takes_the_same_choices_in_every_tool(tool, capsys, monkeypatch):
    assert "--dtype {auto,float32,bfloat16,float16}" in help_text(tool, capsys, monkeypatch)


@pytest.mark.parametrize("tool", ["minigpt4-chat", "minigpt4-caption", "minigpt4-demo", "minigpt4-build-stage2-data"])
def test_sampling_is_one_switch_in_every_generating_tool(tool, capsys, monkeypatch):
    text = help_text(tool, capsys, monkeypatch)
    assert "--sample, --no-sample" in text
    assert "--greedy" not in text


def test_every_flag_also_takes_its_underscore_spelling():
    dashed = chat.parse_args(["--model", "m", "--max-new-tokens", "5", "--top-p", "0.5", "--no-sample",
                              "--device-map", "auto"])
    underscored = chat.parse_args(["--model", "m", "--max_new_tokens", "5", "--top_p=0.5", "--no_sample",
                                   "--device_map", "auto"])
    assert vars(underscored) == vars(dashed)


def run_tool(module: str, argv: list[str], cwd, capsys, monkeypatch) -> tuple[int, str]:
    """`python -m minigpt4_hf.cli.MODULE ARGV` from `cwd`, in this process: `(exit status, stderr)`."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"minigpt4_hf.cli.{module}").cli()
    return exit_info.value.code, capsys.readouterr().err


def test_a_usage_error_is_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch):
    status, stderr = run_tool("chat", ["--model", "m", "--no-such-flag"], tmp_path, capsys, monkeypatch)
    assert status == 2
    assert stderr.splitlines() == [
        "minigpt4-chat: error: unrecognized arguments: --no-such-flag (see minigpt4-chat --help)"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written, before any model is loaded.


@pytest.fixture
def workspace(tmp_path, tiny_saved_dir):
    """A folder with a cc_sbu_align folder, an earlier run's output, a Trainer checkpoint and a copy of a model."""
    align = tmp_path / "cc_sbu_align"
    (align / "image").mkdir(parents=True)
    (align / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "0", "caption": "a cup"}]}))
    (align / "image" / "0.jpg").write_bytes(EXAMPLE_IMAGE.read_bytes())
    (tmp_path / "earlier_run" / "checkpoint-2").mkdir(parents=True)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text((tiny_saved_dir / "config.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    safetensors.torch.save_file({"language_projection.weight": torch.zeros(2, 2),
                                 "language_projection.bias": torch.zeros(2)}, str(checkpoint / "model.safetensors"))
    return tmp_path


BAD_INPUT = {  # case -> ([module in minigpt4_hf.cli, *argv], the start of the one line on stderr)
    "missing model folder": (
        ["chat", "--model", "nowhere/model/", "--prompt", "Hi", "--image", str(EXAMPLE_IMAGE)],
        "minigpt4-chat: error: --model nowhere/model/: no such folder.",
    ),
    "missing image": (
        ["chat", "--model", "{model}", "--image", "photo.jpg", "--prompt", "Hi"],
        "minigpt4-chat: error: --image photo.jpg: no such file.",
    ),
    "missing images folder": (
        ["caption", "--model", "{model}", "--images", "photos", "--output", "out.jsonl"],
        "minigpt4-caption: error: --images photos: no such folder or file.",
    ),
    "missing model folder of the demo": (
        ["demo", "--model", "./model"],
        "minigpt4-demo: error: --model ./model: no such folder.",
    ),
    "missing model folder of the demo load test": (
        ["demo_load_test", "--model", "./model", "--sessions", "2"],
        "minigpt4-demo-load-test: error: --model ./model: no such folder.",
    ),
    "missing image of the quickstart": (
        ["quickstart", "--image", "photo.jpg", "--output-dir", "tiny"],
        "minigpt4-quickstart: error: --image photo.jpg: no such file.",
    ),
    "missing language model folder": (
        ["convert", "--blip2", "{model}", "--llm", "vicuna", "--projection-checkpoint",
         str(EXAMPLE_IMAGE), "--output-dir", "converted"],
        "minigpt4-convert: error: --llm vicuna: no such folder.",
    ),
    "missing data path": (
        ["train", "--stage", "2", "--model", "{model}", "--data-path", "my_data",
         "--output-dir", "trained"],
        "minigpt4-train: error: --data-path 'my_data' matches no file or folder.",
    ),
    "data path at the image folder of cc_sbu_align": (
        ["train", "--stage", "2", "--model", "{model}", "--data-path", "cc_sbu_align/image",
         "--output-dir", "trained"],
        "minigpt4-train: error: --data-path cc_sbu_align/image is the image folder of a cc_sbu_align folder: point at "
        "the folder that holds filter_cap.json",
    ),
    "output folder of an earlier run": (
        ["train", "--stage", "2", "--model", "{model}", "--data-path", "cc_sbu_align",
         "--output-dir", "earlier_run"],
        "minigpt4-train: error: --output-dir earlier_run holds an earlier run (checkpoint-2): pass --resume to "
        "continue it, --overwrite-output-dir",
    ),
    "Trainer checkpoint where a full model is expected": (
        ["chat", "--model", "run/checkpoint-3", "--image", str(EXAMPLE_IMAGE)],
        "minigpt4-chat: error: --model run/checkpoint-3 is a Trainer checkpoint (step 3: trained weights and optimizer "
        "state only), not a full model. Use the run's --output-dir (the full model is written there when the run "
        "ends; finish a stopped run with minigpt4-train, the same flags and --resume run/checkpoint-3), or see "
        "docs/command-line.md, 'Trainer checkpoints'.",
    ),
    "missing stage-1 model of the stage-2 builder": (
        ["build_stage2_data", "--steps", "describe", "--images", "cc_sbu_align/image", "--model",
         "stage1", "--work-dir", "work"],
        "minigpt4-build-stage2-data: error: --model stage1: no such folder.",
    ),
    "zero benchmark repeats": (
        ["benchmark", "--repeats", "0", "--json", "bench.json"],
        "minigpt4-benchmark: error: argument --repeats: must be at least 1, got 0",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_status_2_and_nothing_written(case, workspace, tiny_saved_dir, capsys,
                                                                 monkeypatch):
    (module, *argv), expected = BAD_INPUT[case]
    before = snapshot(workspace)
    argv = [arg.replace("{model}", str(tiny_saved_dir)) for arg in argv]
    status, stderr = run_tool(module, argv, workspace, capsys, monkeypatch)
    assert status == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(expected), stderr
    assert snapshot(workspace) == before


def test_root_modules_import_without_peft_datasets_accelerate_or_gradio(tmp_path):
    probe = ("import sys\n"
             "for name in ('peft', 'datasets', 'accelerate', 'gradio'):\n"
             "    sys.modules[name] = None  # importing one now fails\n"
             "import configuration_minigpt4, modeling_minigpt4, processing_minigpt4\n")
    result = run_python(["-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
