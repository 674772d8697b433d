"""minigpt4-check-transformers: arguments, the comparison with the reference release, the table; one real run on the
installed transformers (standing in for a built environment), without building any environment."""

import copy
import json
import re
import sys

import pytest
import torch
import transformers

from configuration_minigpt4 import MINIMUM_TRANSFORMERS_VERSION
from conftest import REPO_ROOT
from minigpt4_hf.cli.check_transformers_versions import main, parse_args
from minigpt4_hf.model_card import build_model_card
from minigpt4_hf.transformers_versions import (
    DEFAULT_VERSIONS,
    LOSS_TOLERANCE,
    NEWEST_RELEASE,
    READY_MARKER,
    SUPPORTED_RELEASES,
    VersionResult,
    below_floor,
    compare_with_reference,
    refusal_message,
    results_table,
)


PROG = "check_transformers_versions.py"


def passing_report(release: str = NEWEST_RELEASE) -> dict:
    """A probe report of a release where everything worked (the shape remote_code_probe.py prints)."""
    return {
        "transformers": release,
        "stage": "done",
        "error": None,
        "results": {
            "greedy": [5, 6, 7, 8],
            "batched": [[5, 6, 7, 8], [5, 9, 10, 11]],
            "decoded": ["a cat", "two dogs"],
            "streamed": [5, 6, 7, 8],
            "uncached": [5, 6, 7, 8],
            "per_row_stop": {"stop_id": 6, "pad_token_id": 0, "ids": [[5, 6, 0, 0], [5, 9, 10, 11]]},
            "loss": 6.5,
            "trainable_get_grads": True,
        },
    }


def with_result(report: dict, name: str, value) -> dict:
    changed = copy.deepcopy(report)
    changed["results"][name] = value
    return changed


def below_floor_release() -> str:
    return next(release for release in DEFAULT_VERSIONS if below_floor(release))


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def test_versions_all_means_every_supported_minor_release():
    assert parse_args(["--versions", "all"]).versions == list(SUPPORTED_RELEASES)


def test_default_versions_cover_below_the_floor_the_floor_4_57_6_a_mid_5x_and_the_newest():
    args = parse_args([])
    assert args.versions == list(DEFAULT_VERSIONS)
    assert args.reference == NEWEST_RELEASE == SUPPORTED_RELEASES[-1]
    assert any(below_floor(release) for release in args.versions)
    assert {MINIMUM_TRANSFORMERS_VERSION, "4.57.6", NEWEST_RELEASE} <= set(args.versions)
    assert any(release.startswith("5.") and release != NEWEST_RELEASE for release in args.versions)


def test_underscore_spellings_of_the_flags_are_accepted(tmp_path):
    args = parse_args(["--versions", "5.0.0", "--output_dir", str(tmp_path / "out"), "--venv_dir", str(tmp_path)])
    assert (args.output_dir, args.venv_dir) == (tmp_path / "out", tmp_path)


@pytest.mark.parametrize("bad", ["latest", "5.10", "5.24.0rc1", "5.25.0.dev0"])
def test_a_version_that_is_not_a_release_is_refused_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--versions", "5.0.0", bad])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"{PROG}: error: {bad!r} is not a transformers release")


def test_a_reference_below_the_floor_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--reference", below_floor_release()])
    assert "below the supported floor" in capsys.readouterr().err


def test_a_model_folder_without_config_is_refused_before_anything_is_written(tmp_path, capsys):
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--output-dir", str(output_dir), "--venv-dir", str(tmp_path / "venvs")])
    assert exit_info.value.code == 2
    assert "no config.json" in capsys.readouterr().err
    assert not output_dir.exists() and not (tmp_path / "venvs").exists()


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {' '.join(DEFAULT_VERSIONS)})" in help_text
    assert f"(default: {NEWEST_RELEASE})" in help_text
    assert "(default: outputs/transformers-versions)" in help_text


# ---------------------------------------------------------------------------------------------------------------------
# Comparison with the reference release


def test_a_release_with_the_reference_results_passes():
    row = compare_with_reference("5.10.4", passing_report("5.10.4"), passing_report())
    assert (row.load, row.generate, row.ids_equal, row.loss_diff, row.status) == ("ok", "ok", "yes", 0.0, "pass")


def test_different_greedy_ids_fail_the_release():
    report = with_result(passing_report("5.10.4"), "batched", [[5, 6, 7, 9], [5, 9, 10, 11]])
    row = compare_with_reference("5.10.4", report, passing_report())
    assert (row.ids_equal, row.status) == ("no", "FAIL")
    assert "ids differ from the reference's: batched" in row.problems


def test_the_loss_may_differ_by_the_tolerance_and_no_more():
    reference = passing_report()
    close = with_result(passing_report("5.0.0"), "loss", 6.5 + LOSS_TOLERANCE / 2)
    assert compare_with_reference("5.0.0", close, reference).status == "pass"
    far = with_result(passing_report("5.0.0"), "loss", 6.5 + LOSS_TOLERANCE * 3)
    row = compare_with_reference("5.0.0", far, reference)
    assert row.status == "FAIL" and row.loss_diff == pytest.approx(LOSS_TOLERANCE * 3)


def test_a_load_error_fails_the_release_with_the_error():
    report = {"stage": "load", "error": "ImportError: cannot import name 'X'", "results": {}}
    row = compare_with_reference("5.0.0", report, passing_report())
    assert (row.load, row.generate, row.status) == ("FAIL", "-", "FAIL")
    assert row.problems == ["load: ImportError: cannot import name 'X'"]


def test_a_generate_error_fails_after_a_successful_load():
    report = {"stage": "generate", "error": "AttributeError: no attribute 'cache'", "results": {}}
    row = compare_with_reference("5.23.0", report, passing_report())
    assert (row.load, row.generate, row.status) == ("ok", "FAIL", "FAIL")


def test_differently_decoded_text_fails_the_release():
    report = with_result(passing_report("4.57.6"), "decoded", ["▁a ▁cat", "two dogs"])
    row = compare_with_reference("4.57.6", report, passing_report())
    assert row.status == "FAIL" and "ids differ from the reference's: decoded" in row.problems


def test_streamed_ids_that_differ_from_generate_fail_even_when_equal_to_the_reference():
    reference = with_result(passing_report(), "streamed", [5, 6, 7, 1])
    report = with_result(passing_report("5.0.0"), "streamed", [5, 6, 7, 1])
    row = compare_with_reference("5.0.0", report, reference)
    assert row.status == "FAIL" and "streamed ids differ from generate's" in row.problems


def test_ids_without_the_cache_must_equal_ids_with_it():
    report = with_result(passing_report("5.23.0"), "uncached", [5, 1, 1, 1])
    row = compare_with_reference("5.23.0", report, passing_report())
    assert "ids with the cache differ from ids without it" in row.problems


def test_a_row_that_runs_past_its_stop_sequence_fails():
    stop = {"stop_id": 6, "pad_token_id": 0, "ids": [[5, 6, 7, 8], [5, 9, 10, 11]]}
    report = with_result(passing_report("5.0.0"), "per_row_stop", stop)
    row = compare_with_reference("5.0.0", report, with_result(passing_report(), "per_row_stop", stop))
    assert "the first row did not stop at its stop sequence" in row.problems


def test_a_release_below_the_floor_passes_only_when_refused_with_the_one_line_error():
    release = below_floor_release()
    refused = {"stage": "load", "error": refusal_message(release), "results": {}}
    assert compare_with_reference(release, refused, passing_report()).status == "pass (refused)"
    deep_error = {"stage": "load", "error": "ImportError: cannot import name 'PreTrainedConfig'", "results": {}}
    assert compare_with_reference(release, deep_error, passing_report()).status == "FAIL"
    assert compare_with_reference(release, passing_report(release), passing_report()).status == "FAIL"


def test_the_refusal_names_the_floor_the_found_release_and_the_pip_command():
    assert refusal_message("4.56.2") == (
        f"ImportError: MiniGPT-4's remote code needs transformers >= {MINIMUM_TRANSFORMERS_VERSION} (found 4.56.2): "
        f'pip install -U "transformers>={MINIMUM_TRANSFORMERS_VERSION}"'
    )


def test_table_lists_releases_in_version_order_with_the_reasons_of_failures():
    rows = [
        VersionResult("5.10.4", "ok", "ok", "yes", 0.0, "pass", setup_s=100, check_s=30),
        VersionResult("5.9.0", "FAIL", "-", "-", None, "FAIL", ["load: ImportError: boom"]),
        VersionResult("4.57.6", "ok", "ok", "yes", 1e-7, "pass"),
    ]
    table = results_table(rows, NEWEST_RELEASE)
    lines = table.splitlines()
    assert "| transformers | load | generate | ids equal | loss diff | status | setup s | check s |" in lines
    releases = [line.split("|")[1].strip() for line in lines if re.match(r"\| \d", line)]
    assert releases == ["4.57.6", "5.9.0", "5.10.4"]
    assert "| 5.10.4 | ok | ok | yes | 0.0e+00 | pass | 100 | 30 |" in lines
    assert lines[-1] == "- 5.9.0: load: ImportError: boom"


# ---------------------------------------------------------------------------------------------------------------------
# One real run


def test_main_checks_the_installed_release_end_to_end(tiny_saved_dir, tmp_path, capsys):
    """The installed transformers stands in for a built environment: its python is linked where the venv would be."""
    release = transformers.__version__
    venv = tmp_path / "venvs" / f"transformers-{release}"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / READY_MARKER).write_text(json.dumps({"transformers": release, "torch": "torch==0"}))
    output_dir = tmp_path / "out"
    status = main(["--versions", release, "--reference", release, "--model", str(tiny_saved_dir), "--torch",
                   "torch==0", "--venv-dir", str(tmp_path / "venvs"), "--output-dir", str(output_dir)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"| {release} | ok | ok | yes | 0.0e+00 | pass |" in printed
    assert (output_dir / "results.md").read_text().strip() == printed.strip()
    report = json.loads((output_dir / "reports" / f"transformers-{release}.json").read_text())
    assert report["results"]["classes"] == ["MiniGPT4Config", "MiniGPT4Processor",
                                            "MiniGPT4ForConditionalGeneration", "MiniGPT4ForConditionalGeneration"]
    assert report["results"]["remote_code"] is True


# ---------------------------------------------------------------------------------------------------------------------
# Declared


def test_setup_py_states_the_supported_transformers_range_and_declares_the_entry_point():
    setup_py = " ".join(line.strip().lstrip("# ") for line in (REPO_ROOT / "setup.py").read_text().splitlines())
    floor_minor = ".".join(MINIMUM_TRANSFORMERS_VERSION.split(".")[:2])
    assert f"supports transformers>={floor_minor},<6: every release from {MINIMUM_TRANSFORMERS_VERSION} to " \
           f"{NEWEST_RELEASE}" in setup_py
    assert '"minigpt4-check-transformers = minigpt4_hf.cli.check_transformers_versions:cli"' in setup_py


def test_model_card_states_the_supported_transformers_range(tiny_shared):
    model, _ = tiny_shared
    card = build_model_card(model.config, "someone/minigpt4-tiny", [], torch.float32, {}, [])
    assert f"runs on transformers >= {MINIMUM_TRANSFORMERS_VERSION} (tested on" in str(card)
    assert f"up to {NEWEST_RELEASE}" in str(card)
