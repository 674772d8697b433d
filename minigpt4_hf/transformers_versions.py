"""
Checks that a converted MiniGPT-4 folder runs, as Hub remote code, on every supported transformers release.

For each release: a virtual environment with torch and that transformers only (built once, then reused), in which
`remote_code_probe.py` loads the folder from an empty directory with `python -I` (so only the code copied into the
folder can run), generates and computes a training loss. Each release's greedy ids and loss are compared with the
reference release's (the newest supported one). A release below the supported floor must be refused with the one-line
error of `configuration_minigpt4.check_transformers_version`.

The command line is `minigpt4-check-transformers` (minigpt4_hf/cli/check_transformers_versions.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging import version

from configuration_minigpt4 import MINIMUM_TRANSFORMERS_VERSION, check_transformers_version
from minigpt4_hf.files import atomic_path, write_text_atomically


PROBE_SCRIPT = Path(__file__).resolve().parent / "remote_code_probe.py"
# The floor and the latest patch of every supported minor release, oldest first (all measured:
# docs/transformers-versions.md).
SUPPORTED_RELEASES = (
    "4.57.0", "4.57.6", "5.0.0", "5.1.0", "5.2.0", "5.3.0", "5.4.0", "5.5.4", "5.6.2", "5.7.0", "5.8.1", "5.9.0", "5.10.4",
    "5.11.0", "5.12.1", "5.13.1", "5.14.1", "5.15.1", "5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.1",
    "5.22.2", "5.23.0", "5.24.0",
)
NEWEST_RELEASE = SUPPORTED_RELEASES[-1]
# What CI checks: the release below the floor (refused in one line), the floor, 4.57's last patch, 5.0, a 5.x from
# before dataclass configs' sub-config specs and the generate-side image handling, and the newest.
DEFAULT_VERSIONS = ("4.56.2", MINIMUM_TRANSFORMERS_VERSION, "4.57.6", "5.0.0", "5.10.4", NEWEST_RELEASE)
# Packages the remote code imports besides torch and transformers (pip picks versions that fit the transformers).
VENV_PACKAGES = ("safetensors", "tokenizers", "huggingface_hub", "pillow", "sentencepiece", "protobuf")
LOSS_TOLERANCE = 1e-6
PROBE_TIMEOUT_S = 1800
READY_MARKER = "minigpt4-venv.json"


def supported_transformers_text() -> str:
    """The supported range in words, for model cards and docs."""
    return (
        f"transformers >= {MINIMUM_TRANSFORMERS_VERSION} (tested on {', '.join(SUPPORTED_RELEASES[:2])} and the "
        f"latest patch of every 5.x minor release up to {NEWEST_RELEASE}; an older transformers stops with a one-line "
        "error naming the upgrade)"
    )


def default_torch_requirement() -> str:
    """`torch==X` for the torch of this interpreter (a local CPU wheel stays local; an unpinned torch would not)."""
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def is_release(text: str) -> bool:
    """Whether `text` names a final release in full (`5.10.4`), which pip installs as `transformers==text`."""
    try:
        parsed = version.Version(text)
    except version.InvalidVersion:
        return False
    return str(parsed) == text and len(parsed.release) == 3 and not (parsed.is_prerelease or parsed.is_devrelease)


def below_floor(release: str) -> bool:
    """Whether the remote code must refuse `release` (older than `MINIMUM_TRANSFORMERS_VERSION`)."""
    return version.Version(release) < version.Version(MINIMUM_TRANSFORMERS_VERSION)


def refusal_message(release: str) -> str:
    """The one line with which importing the remote code under `release` fails (`ImportError: ...`)."""
    try:
        check_transformers_version(release)
    except ImportError as error:
        return f"ImportError: {error}"
    raise ValueError(f"transformers {release} is supported: it is not refused.")


# ---------------------------------------------------------------------------------------------------------------------
# Virtual environments


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_is_ready(venv: Path, release: str, torch_requirement: str) -> bool:
    """Whether `venv` was completely built for this transformers release and torch requirement."""
    marker = venv / READY_MARKER
    if not marker.is_file() or not venv_python(venv).exists():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    return recorded.get("transformers") == release and recorded.get("torch") == torch_requirement


def build_venv(venv: Path, release: str, torch_requirement: str, log_path: Path) -> None:
    """
    Builds (or rebuilds, when incomplete) a virtual environment with `torch_requirement`, `transformers==release` and
    the packages loading needs. The ready marker is written last: a half-built environment is never used.
    """
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # --no-compile: bytecode is written on first import, for the modules used (far less than torch's whole tree).
    pip_install = [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check"]
    steps = {
        "python -m venv": [sys.executable, "-m", "venv", str(venv)],
        f"pip install {torch_requirement}": [*pip_install, torch_requirement],
        f"pip install transformers=={release}": [*pip_install, f"transformers=={release}", torch_requirement,
                                                 *VENV_PACKAGES],
    }
    with open(log_path, "a", encoding="utf-8") as log:
        for step, command in steps.items():
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                raise RuntimeError(f"`{step}` failed (exit {result.returncode}); see {log_path}")
    write_text_atomically(venv / READY_MARKER, json.dumps({"transformers": release, "torch": torch_requirement}))


# ---------------------------------------------------------------------------------------------------------------------
# Running the probe


def run_probe_in_venv(python: Path, model_dir: Path, image_path: Path, log_path: Path) -> dict:
    """
    Runs remote_code_probe.py with `python -I` from an empty directory, with a throwaway remote-code module cache.
    Returns its JSON report, or a report with `stage="crash"` when it printed none.
    """
    with tempfile.TemporaryDirectory(prefix="minigpt4-probe-") as scratch:
        workdir = Path(scratch) / "cwd"
        workdir.mkdir()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS"))}
        env.update(HF_MODULES_CACHE=str(Path(scratch) / "modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        command = [str(python), "-I", str(PROBE_SCRIPT), str(model_dir), str(image_path)]
        try:
            result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                                    timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"stage": "crash", "error": f"timed out after {PROBE_TIMEOUT_S} s", "results": {}}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n{result.stderr}\n")
    lines = result.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"stage": "crash", "error": f"exit {result.returncode}: {tail}", "results": {}}


# ---------------------------------------------------------------------------------------------------------------------
# Comparison and table


@dataclass
class VersionResult:
    """One release's row of the table."""

    release: str
    load: str = "-"
    generate: str = "-"
    ids_equal: str = "-"
    loss_diff: float | None = None
    status: str = "FAIL"
    problems: list[str] = field(default_factory=list)
    setup_s: float = 0.0
    check_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status.startswith("pass")


# The results that must be identical to the reference release's (ids, and the batch's ids decoded).
COMPARED_IDS = ("greedy", "batched", "streamed", "per_row_stop", "uncached", "decoded")


def self_consistency_problems(results: dict) -> list[str]:
    """What one release's probe results say is wrong on their own (streaming, cache and per-row stop)."""
    problems = []
    if results.get("streamed") != results.get("greedy"):
        problems.append("streamed ids differ from generate's")
    if results.get("uncached") != results.get("greedy"):
        problems.append("ids with the cache differ from ids without it")
    stop = results.get("per_row_stop")
    batched = results.get("batched")
    if stop is None or not batched:
        problems.append("no token to test the per-row stop with")
    else:
        first, second = stop["ids"]
        cut = batched[0].index(stop["stop_id"]) + 1
        if first[:cut] != batched[0][:cut] or any(token != stop["pad_token_id"] for token in first[cut:]):
            problems.append("the first row did not stop at its stop sequence")
        if second != batched[1]:
            problems.append("the other row did not run on past the first row's stop")
    if not results.get("trainable_get_grads"):
        problems.append("the training backward left trainable parameters without gradients")
    return problems


def compare_with_reference(release: str, report: dict, reference: dict | None) -> VersionResult:
    """Turns a probe report into a table row, comparing ids and loss with the reference release's report."""
    row = VersionResult(release=release)
    stage, error = report.get("stage"), report.get("error")
    if below_floor(release):
        expected = refusal_message(release)
        row.load = "refused" if error == expected else "FAIL"
        row.status = "pass (refused)" if error == expected else "FAIL"
        if error != expected:
            row.problems.append(f"expected {expected!r}, got {error or 'no error'!r}")
        return row
    order = ["import", "load", "generate", "train", "done"]
    reached = order.index(stage) if stage in order else -1
    row.load = "ok" if reached > order.index("load") else "FAIL"
    row.generate = "ok" if reached > order.index("generate") else ("FAIL" if row.load == "ok" else "-")
    if error:
        row.problems.append(f"{stage}: {error}")
        return row
    results = report["results"]
    row.problems.extend(self_consistency_problems(results))
    if reference is None or reference.get("error"):
        row.problems.append("no reference results to compare with")
        return row
    expected = reference["results"]
    differing = [name for name in COMPARED_IDS if results.get(name) != expected.get(name)]
    row.ids_equal = "yes" if not differing else "no"
    if differing:
        row.problems.append(f"ids differ from the reference's: {', '.join(differing)}")
    row.loss_diff = abs(results["loss"] - expected["loss"])
    if row.loss_diff > LOSS_TOLERANCE:
        row.problems.append(f"loss differs by {row.loss_diff:.2e} (> {LOSS_TOLERANCE:g})")
    row.status = "pass" if not row.problems else "FAIL"
    return row


def results_table(rows: list[VersionResult], reference_release: str) -> str:
    """The Markdown table (one row per release, oldest first) and, below it, every failure's reasons."""
    lines = [
        f"Compared with transformers {reference_release}: greedy ids must be identical, the loss within "
        f"{LOSS_TOLERANCE:g}.",
        "",
        "| transformers | load | generate | ids equal | loss diff | status | setup s | check s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: version.Version(row.release)):
        loss = "-" if row.loss_diff is None else f"{row.loss_diff:.1e}"
        lines.append(f"| {row.release} | {row.load} | {row.generate} | {row.ids_equal} | {loss} | {row.status} | "
                     f"{row.setup_s:.0f} | {row.check_s:.0f} |")
    failures = [row for row in rows if not row.passed]
    if failures:
        lines.append("")
        lines.extend(f"- {row.release}: {'; '.join(row.problems)}" for row in failures)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The whole check


def build_tiny_model_folder(destination: Path) -> Path:
    """Saves the tiny random model and its processor as the converter would (remote code included)."""
    from minigpt4_hf.random_models import build_random_model

    model, processor = build_random_model("tiny", seed=0)
    with atomic_path(destination, directory=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return destination


def check_release(release: str, venv_dir: Path, output_dir: Path, model_dir: Path, image_path: Path,
                  torch_requirement: str) -> tuple[dict, float, float]:
    """Builds (or reuses) the release's environment and runs the probe; returns `(report, setup_s, check_s)`."""
    venv = venv_dir / f"transformers-{release}"
    log_path = output_dir / "logs" / f"transformers-{release}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not venv_is_ready(venv, release, torch_requirement):
        try:
            build_venv(venv, release, torch_requirement, log_path)
        except RuntimeError as error:
            return {"stage": "setup", "error": str(error), "results": {}}, time.perf_counter() - start, 0.0
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    report = run_probe_in_venv(venv_python(venv), model_dir, image_path, log_path)
    check_s = time.perf_counter() - start
    write_text_atomically(output_dir / "reports" / f"transformers-{release}.json", json.dumps(report, indent=1))
    return report, setup_s, check_s


def check_releases(releases: list[str], reference_release: str, venv_dir: Path, output_dir: Path, model_dir: Path,
                   image_path: Path, torch_requirement: str) -> list[VersionResult]:
    """Checks `releases` (the reference first) and returns one row per release (the reference included)."""
    from tqdm.auto import tqdm

    order = [reference_release] + [release for release in releases if release != reference_release]
    reports, timings = {}, {}
    for release in tqdm(order, desc="transformers releases", unit="release"):
        report, setup_s, check_s = check_release(release, venv_dir, output_dir, model_dir, image_path,
                                                 torch_requirement)
        reports[release], timings[release] = report, (setup_s, check_s)
    rows = []
    for release in order:
        row = compare_with_reference(release, reports[release], reports[reference_release])
        row.setup_s, row.check_s = timings[release]
        rows.append(row)
    return rows


def write_results(rows: list[VersionResult], reference_release: str, output_dir: Path) -> str:
    """Writes results.md (the table) and results.json (every row) to `output_dir`; returns the table."""
    table = results_table(rows, reference_release)
    write_text_atomically(output_dir / "results.md", table + "\n")
    payload = {"reference": reference_release, "rows": [asdict(row) for row in rows]}
    write_text_atomically(output_dir / "results.json", json.dumps(payload, indent=1))
    return table
