"""The README's commands are the ones CI and a new user run, and its core usage code runs as written."""

import re
import subprocess

import pytest

from conftest import REPO_ROOT


README = (REPO_ROOT / "README.md").read_text()


def fenced_blocks(language: str | None = None) -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
    return [body for lang, body in blocks if language is None or lang == language]


def test_first_block_holds_exactly_the_two_setup_lines():
    lines = fenced_blocks()[0].strip().splitlines()
    assert len(lines) == 2
    install_and_run, install_and_test = lines
    assert "pip install" in install_and_run and "scripts/quickstart.py" in install_and_run
    assert "pip install" in install_and_test and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(["awk", "/^```/{n++; next} n==1", "README.md"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()[1]
    assert extracted == fenced_blocks()[0].strip().splitlines()[1]
    assert "sed -n 2p" in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("heading", ["### Load and ask", "### A training loss"])
def test_usage_snippet_runs_on_a_saved_tiny_model(heading, tiny_saved_dir, example_image, tmp_path):
    section = README[README.index(heading):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    code = code.replace('"outputs/tiny-minigpt4"', repr(str(tiny_saved_dir)))
    code = code.replace("max_new_tokens=300", "max_new_tokens=4")
    code = code.replace('Image.open("assets/example.jpg")', "example_image")
    namespace = {"example_image": example_image, "image": example_image}
    if heading == "### A training loss":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        namespace["model"] = AutoModelForImageTextToText.from_pretrained(tiny_saved_dir, trust_remote_code=True)
        namespace["processor"] = AutoProcessor.from_pretrained(tiny_saved_dir, trust_remote_code=True)
    exec(compile(code, heading, "exec"), namespace)
    if heading == "### A training loss":
        assert namespace["loss"].item() > 0
    else:
        assert namespace["generated"].shape[1] == namespace["inputs"]["input_ids"].shape[1] + 4
