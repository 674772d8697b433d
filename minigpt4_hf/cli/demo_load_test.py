#!/usr/bin/env python
"""
Load test of the web demo with a real client: starts the demo on 127.0.0.1 (never another address), drives it from
--sessions concurrent `gradio_client` sessions, and checks that every session gets its own answers.

    python scripts/demo_load_test.py --model PATH --sessions 8

Each session uploads a different image and asks two questions (greedy). Every answer is compared with the same chat
run alone in this process (`Conversation`): the chat a session sees after each answer must equal that chat exactly.
Prints one JSON line:

    {"sessions": 8, "requests": 16, "errors": 0, "mismatched": 0, "p50_s": ..., "p95_s": ..., "rss_growth_mb": ...}

requests: questions sent (2 per session); errors: questions that got no answer (a failed upload fails both of its
session's questions); mismatched: answered questions whose chat differs from the lone run; p50_s / p95_s: seconds from
sending a question to its complete answer (waiting in the queue included); rss_growth_mb: the demo server's resident
memory once every session is done minus its memory before they started (after a warm-up question). Exits 1 when any
question errored or mismatched or the growth exceeds --max-rss-growth-mb, 0 otherwise.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from minigpt4_hf.cli import demo
from minigpt4_hf.cli.options import (
    CommandLineParser,
    UserError,
    add_model_arguments,
    console_entry_point,
    generation_kwargs_from_args,
    model_loading_kwargs,
    positive_float,
    positive_int,
)


PROG = "minigpt4-demo-load-test"


HOST = "127.0.0.1"  # the load test only ever talks to this machine
QUESTIONS = ("What is in this image?", "Describe it in more detail.")
DEFAULT_MAX_RSS_GROWTH_MB = 100
BYTES_PER_MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--sessions", type=positive_int, default=8,
                        help="Concurrent browser-like sessions (default: %(default)s).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16,
                        help="Tokens per answer (default: %(default)s).")
    parser.add_argument(
        "--max-rss-growth-mb", type=positive_float, default=DEFAULT_MAX_RSS_GROWTH_MB,
        help="Fail when the server's memory grows more than this many MB (default: %(default)s).",
    )
    parser.add_argument("--timeout", type=positive_float, default=600,
                        help="Seconds one step (start, upload, answer) may take (default: %(default)s).")
    return parser.parse_args(argv)


def demo_flags(args: argparse.Namespace, port: int) -> list[str]:
    """
    The demo server's command-line flags: this run's model flags (both sides load the model alike), 127.0.0.1,
    greedy answers, and a queue that holds every session.
    """
    flags = ["--model", str(args.model), "--dtype", args.dtype]
    if args.device is not None:
        flags += ["--device", args.device]
    if args.device_map is not None:
        flags += ["--device-map", args.device_map]
    flags += ["--load-in-8bit"] * args.load_in_8bit + ["--load-in-4bit"] * args.load_in_4bit
    return flags + ["--host", HOST, "--port", str(port), "--no-sample", "--max-new-tokens", str(args.max_new_tokens),
                    "--max-queue-size", str(max(args.sessions, demo.DEFAULT_MAX_QUEUE_SIZE))]


def session_images(folder: str, count: int) -> list[str]:
    """`count` different PNG images (colour, size and a square's place differ)."""
    from PIL import Image, ImageDraw

    paths = []
    for index in range(count):
        image = Image.new("RGB", (64 + 8 * index, 48 + 4 * index), (37 * index % 256, 90 + 11 * index % 160, 200))
        ImageDraw.Draw(image).rectangle((4 * index, 2 * index, 4 * index + 20, 2 * index + 20), fill=(250, 250, 0))
        paths.append(os.path.join(folder, f"session_{index:03d}.png"))
        image.save(paths[-1])
    return paths


def expected_chats(model, processor, images: list[str], server: argparse.Namespace) -> list[list[list[dict]]]:
    """
    For each image, the chat the demo shows after each question when that chat runs alone, with the generation
    settings and context budget that the server's flags `server` give it.
    """
    from minigpt4_hf.inference import Conversation

    chats = []
    for image in images:
        conversation = Conversation(model, processor, generation_kwargs_from_args(server), server.max_context_tokens)
        conversation.upload_image(image)
        after_each = []
        for question in QUESTIONS:
            conversation.ask(question)
            conversation.answer()
            after_each.append(demo.chat_history(conversation))
        chats.append(after_each)
    return chats


def as_turns(history: list[dict]) -> list[tuple[str, str]]:
    """A chat (as the demo shows it, or as gradio_client returns it) as (role, text) pairs."""
    turns = []
    for message in history:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        turns.append((message["role"], content))
    return turns


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(flags: list[str], log) -> subprocess.Popen:
    """Starts the demo with `flags` in a process of its own, its output going to `log`."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "-m", "minigpt4_hf.cli.demo", *flags], stdout=log,
                            stderr=subprocess.STDOUT, env=env)


def wait_until_serving(server: subprocess.Popen, url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise UserError(f"the demo exited with status {server.returncode} before serving: {last_line(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the demo did not answer on {url} within --timeout {timeout:g} s: {last_line(log_path)}")
        time.sleep(0.25)


def last_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as file:
        lines = [line.strip() for line in file if line.strip()]
    return lines[-1] if lines else "(no output)"


def resident_mb(pid: int) -> float:
    """A process's resident memory (RSS) in MB."""
    import psutil

    return psutil.Process(pid).memory_info().rss / BYTES_PER_MB


@dataclass
class SessionResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    mismatched: int = 0
    problems: list[str] = field(default_factory=list)


def run_session(url: str, image: str, expected: list[list[dict]] | None, timeout: float,
                start: threading.Barrier | None = None) -> SessionResult:
    """
    One user: connect, upload `image`, wait at `start` until every session is ready, then ask the questions in turn
    and compare each chat with `expected` (None: no comparison).
    """
    from gradio_client import Client, handle_file

    result, client = SessionResult(), None
    try:
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False,
                        httpx_kwargs={"timeout": timeout})
        client.submit(handle_file(image), api_name="/upload_image").result(timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any failure of the client or the server is a counted error
        result.errors += len(QUESTIONS)
        result.problems.append(f"upload: {type(error).__name__}: {error}")
    try:
        if start is not None:
            start.wait(timeout=timeout)
    except threading.BrokenBarrierError:
        pass
    for number, question in enumerate(QUESTIONS):
        if result.problems:
            break
        sent = time.monotonic()
        try:
            client.submit(question, api_name="/ask").result(timeout=timeout)
            history, _ = client.submit(1, 1.0, api_name="/answer").result(timeout=timeout)
        except Exception as error:  # noqa: BLE001
            result.errors += len(QUESTIONS) - number
            result.problems.append(f"question {number + 1}: {type(error).__name__}: {error}")
            break
        result.latencies.append(time.monotonic() - sent)
        if expected is not None and as_turns(history) != as_turns(expected[number]):
            result.mismatched += 1
            result.problems.append(f"question {number + 1}: the chat differs from the same chat run alone")
    if client is not None:
        client.close()
    return result


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` quantile (inclusive method; the value itself for one sample); None without samples."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1], 3)


def summarize(results: list[SessionResult], rss_growth_mb: float) -> dict:
    """The JSON report of a run."""
    latencies = [latency for result in results for latency in result.latencies]
    return {
        "sessions": len(results),
        "requests": len(results) * len(QUESTIONS),
        "errors": sum(result.errors for result in results),
        "mismatched": sum(result.mismatched for result in results),
        "p50_s": percentile(latencies, 0.50),
        "p95_s": percentile(latencies, 0.95),
        "rss_growth_mb": round(rss_growth_mb, 1),
    }


def exit_status(report: dict, max_rss_growth_mb: float) -> int:
    """1 when a question errored or mismatched or the server grew beyond the bound, else 0."""
    failed = report["errors"] or report["mismatched"] or report["rss_growth_mb"] > max_rss_growth_mb
    return 1 if failed else 0


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import gradio_client  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as error:
        raise UserError(f"The load test needs {error.name}: pip install '.[demo]'.") from None
    port = free_port()
    flags = demo_flags(args, port)
    url = f"http://{HOST}:{port}/"
    with tempfile.TemporaryDirectory(prefix="minigpt4-load-test-") as folder:
        images = session_images(folder, args.sessions + 1)  # the last one is the warm-up's
        log_path = os.path.join(folder, "demo.log")
        with open(log_path, "w", encoding="utf-8") as log:
            server = start_server(flags, log)
            try:
                from minigpt4_hf.inference import load_model_and_processor

                # loaded while the server starts
                model, processor = load_model_and_processor(args.model, **model_loading_kwargs(args))
                expected = expected_chats(model, processor, images[:-1], demo.parse_args(flags))
                wait_until_serving(server, url, args.timeout, log_path)
                warm_up = run_session(url, images[-1], None, args.timeout)
                if warm_up.problems:
                    raise UserError(f"the warm-up question failed: {warm_up.problems[0]}")
                start = threading.Barrier(args.sessions)
                baseline_mb = resident_mb(server.pid)
                with ThreadPoolExecutor(args.sessions) as pool:
                    futures = [pool.submit(run_session, url, image, chat, args.timeout, start)
                               for image, chat in zip(images, expected)]
                    results = [future.result() for future in futures]
                growth_mb = resident_mb(server.pid) - baseline_mb
            finally:
                stop(server)
    for number, result in enumerate(results):
        for problem in result.problems:
            print(f"session {number + 1}: {problem}", file=sys.stderr)
    report = summarize(results, growth_mb)
    print(json.dumps(report), flush=True)
    return exit_status(report, args.max_rss_growth_mb)


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
