"""
scripts/demo_load_test.py: the demo served on 127.0.0.1 and driven by concurrent gradio_client sessions, every
answer checked against the same chat run alone.
"""

import json
import os
import subprocess
import sys

import pytest

from minigpt4_hf.cli import demo_load_test
from conftest import REPO_ROOT


pytest.importorskip("gradio_client", reason="the load test needs gradio: pip install '.[demo]'")
pytest.importorskip("psutil", reason="the load test needs psutil: pip install '.[demo]'")


def test_eight_sessions_each_get_their_own_answers_with_bounded_server_memory(tiny_seeing_dir):
    # One thread per process: the server and the lone runs compute alike, and a tiny model runs faster so.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "demo_load_test.py"), "--model", str(tiny_seeing_dir),
               "--sessions", "8", "--max-new-tokens", "8"]

    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)

    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    report = json.loads(line)
    assert list(report) == ["sessions", "requests", "errors", "mismatched", "p50_s", "p95_s", "rss_growth_mb"]
    assert (report["sessions"], report["requests"], report["errors"], report["mismatched"]) == (8, 16, 0, 0)
    assert 0 < report["p50_s"] <= report["p95_s"]
    assert report["rss_growth_mb"] <= demo_load_test.DEFAULT_MAX_RSS_GROWTH_MB


@pytest.mark.parametrize("failure", [{"errors": 1}, {"mismatched": 1}])
def test_an_errored_or_mismatched_question_fails_the_run(failure):
    results = [demo_load_test.SessionResult(latencies=[0.5, 0.7]), demo_load_test.SessionResult(**failure)]

    report = demo_load_test.summarize(results, rss_growth_mb=1.0)

    assert report["requests"] == 4 and report[next(iter(failure))] == 1
    assert demo_load_test.exit_status(report, max_rss_growth_mb=100) == 1


def test_memory_growth_beyond_the_bound_fails_the_run():
    report = demo_load_test.summarize([demo_load_test.SessionResult(latencies=[0.5, 0.7])], rss_growth_mb=150.0)
    assert demo_load_test.exit_status(report, max_rss_growth_mb=100) == 1
    assert demo_load_test.exit_status(report, max_rss_growth_mb=200) == 0
