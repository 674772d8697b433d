"""
The README and the pages under docs/ run as written.

Every fenced `bash` and `python` block of README.md and docs/*.md is run, page by page, in document order, in a
fresh folder that looks like a checkout (`minigpt4_hf/`, `scripts/`, `tests/`) and holds the tiny random model at
`outputs/tiny-minigpt4`, where `minigpt4-quickstart` writes it. Bash blocks run in `bash -e -o pipefail`, with the
console commands (`minigpt4-chat`, ...) running this checkout's code; python blocks of a page share one namespace,
as a reader's session would. Only the answers' lengths are cut (TINY_SETTINGS). The console commands are served by
tests/command_server.py, which imports their modules once and forks a child per command, so that the commands do
not each pay for importing torch. A block that cannot run here (a GPU, real weights, the network, a long run) is
marked `bash notest` / `python notest` and says why in its first line. The README's first block (the set-up lines)
is run by CI (.ci/run).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from command_server import SOCKET_VARIABLE, client_source
from conftest import REPO_ROOT


PAGES = ["README.md", *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "docs").glob("*.md"))]
RUN = {"bash", "python"}
NOT_RUN = {"bash notest", "python notest"}
NOT_CODE = {"text", "json"}  # what a command prints or reads, shown as it is
README_BYTES_LIMIT = 15_000
# The tiny random model never ends its turn, so the pages' 300-token answers (the original chat's length) are cut
# short here; nothing else in a block is changed.
TINY_SETTINGS = {"max_new_tokens=300": "max_new_tokens=20"}
# What a docs folder needs from the checkout (read only: blocks write their outputs next to these).
CHECKOUT_PARTS = ("minigpt4_hf", "scripts", "tests")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    info: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(page: str) -> list[Block]:
    """
    The fenced code blocks of a page, with their info strings (`bash`, `python notest`, `text`, ...); a block indented
    in a list item loses that indentation.
    """
    blocks, opened, indent, info, body = [], None, 0, "", []
    for number, line in enumerate((REPO_ROOT / page).read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.lstrip()
        if opened is None and stripped.startswith("```"):
            opened, indent, info, body = number, len(line) - len(stripped), stripped[3:].strip(), []
        elif opened is not None and stripped.rstrip() == "```":
            blocks.append(Block(page, opened, info, "\n".join(body) + "\n"))
            opened = None
        elif opened is not None:
            body.append(line[indent:] if not line[:indent].strip() else stripped)
    assert opened is None, f"{page}:{opened}: code block never closed"
    return blocks


def setup_block() -> Block:
    return fenced_blocks("README.md")[0]


def blocks_to_run(page: str) -> list[Block]:
    return [block for block in fenced_blocks(page) if block.info in RUN and block != setup_block()]


# ----------------------------------------------------------------------------------------------------------------------
# The README's set-up block and size.


def test_readme_first_block_holds_exactly_the_two_setup_lines():
    lines = setup_block().code.strip().splitlines()
    assert len(lines) == 2
    install_and_run, install_and_test = lines
    assert "pip install" in install_and_run and "scripts/quickstart.py" in install_and_run
    assert "pip install" in install_and_test and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(["awk", "/^```/{n++; next} n==1", "README.md"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()[1]
    assert extracted == setup_block().code.strip().splitlines()[1]
    assert "sed -n 2p" in (REPO_ROOT / ".ci" / "run").read_text()


def test_readme_fits_in_15000_bytes():
    assert (REPO_ROOT / "README.md").stat().st_size <= README_BYTES_LIMIT


# ----------------------------------------------------------------------------------------------------------------------
# What the pages may contain.


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_is_run_or_marked_notest(page):
    unknown = [f"{block.where}: {block.info!r}" for block in fenced_blocks(page)
               if block.info not in RUN | NOT_RUN | NOT_CODE]
    assert not unknown, f"blocks must be one of {sorted(RUN | NOT_RUN | NOT_CODE)}: {unknown}"


@pytest.mark.parametrize("page", PAGES)
def test_notest_blocks_say_why_in_their_first_line(page):
    unexplained = [block.where for block in fenced_blocks(page)
                   if block.info in NOT_RUN and not block.code.lstrip().startswith("#")]
    assert not unexplained, f"a notest block starts with a comment that says why it cannot run here: {unexplained}"


@pytest.mark.parametrize("page", PAGES)
def test_pages_never_edit_the_import_path(page):
    assert not re.search(r"sys\.path", (REPO_ROOT / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_files_and_headings_in_the_repository(page):
    text = (REPO_ROOT / page).read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (REPO_ROOT / page).parent / path if path else REPO_ROOT / page
        if not linked.is_file():
            broken.append(target)
        elif anchor and anchor not in heading_anchors(linked):
            broken.append(target)
    assert not broken, f"{page}: links to nothing in the repository: {broken}"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lowercase, punctuation dropped, spaces to dashes)."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


# ----------------------------------------------------------------------------------------------------------------------
# Running the pages.


def console_commands() -> dict[str, str]:
    """`{"minigpt4-chat": "minigpt4_hf.cli.chat:cli", ...}`: the console entry points that setup.py declares."""
    declared = re.findall(r'"(minigpt4-[\w-]+) = ([\w.]+:\w+)"', (REPO_ROOT / "setup.py").read_text())
    assert declared, "setup.py declares no minigpt4-* console entry points"
    return dict(declared)


def blocks_environment(bin_dir: Path | None = None) -> dict[str, str]:
    """The blocks' environment: this checkout's code first, no Hub access, `bin_dir` (if any) first on PATH."""
    path = os.environ.get("PATH", "")
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{path}" if bin_dir else path,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def command_server(tmp_path_factory):
    """A server that runs the console commands from one import of their modules (tests/command_server.py)."""
    folder = tmp_path_factory.mktemp("commands")
    socket_path, log_path = folder / "server.sock", folder / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tests" / "command_server.py"), str(socket_path),
             json.dumps(console_commands())],
            env=blocks_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        assert server.stdout.readline().strip() == "ready", f"the command server did not start:\n{log_path.read_text()}"
        yield socket_path
    finally:
        server.terminate()
        server.wait(timeout=30)


def write_commands(bin_dir: Path) -> None:
    """`python` (this interpreter) and every console entry point (served by the command server)."""
    bin_dir.mkdir()
    launchers = {"python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'}
    launchers.update({command: client_source(command) for command in console_commands()})
    for name, text in launchers.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


@pytest.fixture
def docs_folder(tmp_path, tiny_saved_dir):
    """A working folder like a checkout, with the tiny model where the quickstart writes it."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for part in CHECKOUT_PARTS:
        (folder / part).symlink_to(REPO_ROOT / part)
    shutil.copytree(tiny_saved_dir, folder / "outputs" / "tiny-minigpt4")
    return folder


def run_bash(block: Block, folder: Path, env: dict[str, str]) -> None:
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", with_tiny_settings(block.code)], cwd=folder,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"{block.where}: the bash block exited with status {result.returncode}\n{block.code}\n"
                    f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}")


def with_tiny_settings(code: str) -> str:
    for written, tiny in TINY_SETTINGS.items():
        code = code.replace(written, tiny)
    return code


def run_python(block: Block, namespace: dict) -> None:
    try:
        exec(compile(with_tiny_settings(block.code), block.where, "exec"), namespace)
    except Exception:  # noqa: BLE001 (any failure of a documented block fails the test, with its traceback)
        pytest.fail(f"{block.where}: the python block raised\n{block.code}\n{traceback.format_exc()}")


@pytest.mark.parametrize("page", [page for page in PAGES if blocks_to_run(page)])
def test_page_runs_as_written(page, docs_folder, command_server, tmp_path, monkeypatch):
    write_commands(tmp_path / "bin")
    env = {**blocks_environment(tmp_path / "bin"), SOCKET_VARIABLE: str(command_server)}
    monkeypatch.chdir(docs_folder)
    namespace = {"__name__": "__main__"}
    for block in blocks_to_run(page):
        if block.info == "bash":
            run_bash(block, docs_folder, env)
        else:
            run_python(block, namespace)
