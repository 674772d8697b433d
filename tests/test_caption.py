"""minigpt4-caption: batched captioning to JSON Lines, unreadable images, resuming after an interruption."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

import minigpt4_hf.cli.caption as caption
from minigpt4_hf.cli.options import UserError
from minigpt4_hf.inference import answer_batch
from conftest import REPO_ROOT, write_image_bomb, write_truncated_png


GREEDY = {"max_new_tokens": 5, "num_beams": 1, "do_sample": False, "repetition_penalty": 1.0}


def make_images(folder, count: int) -> list[str]:
    """`count` small PNGs of different colours and sizes, named so that they sort in creation order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"image_{index:03d}.png"
        Image.new("RGB", (40 + 7 * index, 30 + 5 * index), (37 * index % 256, 90, 200 - index)).save(path)
        paths.append(str(path))
    return paths


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


class PeakResidentMemory:
    """Samples this process's resident memory every 5 ms while the block runs; `growth_mb`: the peak minus the start."""

    def __enter__(self):
        psutil = pytest.importorskip("psutil")
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc_info):
        self.stop.set()
        self.sampler.join()
        self.growth_mb = (max(self.peak, self.process.memory_info().rss) - self.start) / 2**20


def run_caption(model_dir, images, output, *extra) -> int:
    return caption.main(["--model", str(model_dir), "--images", str(images), "--output", str(output),
                         "--max-new-tokens", "5", *map(str, extra)])


def test_every_image_gets_one_json_line_with_the_batched_answer(tiny_saved_dir, tiny_shared, tmp_path):
    paths = make_images(tmp_path / "images", 3)
    output = tmp_path / "captions.jsonl"

    assert run_caption(tiny_saved_dir, tmp_path / "images", output, "--batch-size", 2) == 0

    lines = read_lines(output)
    model, processor = tiny_shared
    one_by_one = [answer_batch(model, processor, [path], caption.DEFAULT_PROMPT, GREEDY)[0] for path in paths]
    assert [line["image"] for line in lines] == paths
    assert [line["answer"] for line in lines] == one_by_one
    assert all(line["prompt"] == caption.DEFAULT_PROMPT for line in lines)
    assert all(line["generation"] == {**GREEDY, "seed": None} for line in lines)  # greedy unless --sample


def test_sample_flag_records_the_sampling_settings(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 1)
    output = tmp_path / "captions.jsonl"
    run_caption(tiny_saved_dir, tmp_path / "images", output, "--sample", "--seed", 3, "--prompt", "What is it?")

    (line,) = read_lines(output)
    assert line["prompt"] == "What is it?"
    assert line["generation"] == {**GREEDY, "do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 3}


def test_unreadable_images_get_an_error_line_instead_of_an_answer(tiny_saved_dir, tmp_path):
    good = make_images(tmp_path / "images", 2)
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_text("not an image")
    output = tmp_path / "captions.jsonl"

    assert run_caption(tiny_saved_dir, tmp_path / "images", output, "--batch-size", 3) == 0

    lines = {line["image"]: line for line in read_lines(output)}
    assert set(lines) == {str(broken), *good}
    assert "answer" not in lines[str(broken)]
    assert "cannot identify image file" in lines[str(broken)]["error"]
    assert all("answer" in lines[path] and "error" not in lines[path] for path in good)


def test_bombs_broken_and_empty_files_get_one_line_errors_and_the_batch_goes_on_in_bounded_memory(
    tiny_saved_dir, tmp_path
):
    folder = tmp_path / "images"
    good = make_images(folder, 2)
    bad = {"bomb.png": write_image_bomb, "cut.png": write_truncated_png,
           "empty.jpg": lambda path: path.write_bytes(b"")}
    for name, write in bad.items():
        write(folder / name)
    output = tmp_path / "captions.jsonl"

    with PeakResidentMemory() as memory:
        assert run_caption(tiny_saved_dir, folder, output, "--batch-size", 5) == 0

    lines = {os.path.basename(line["image"]): line for line in read_lines(output)}
    assert all("answer" in lines[os.path.basename(path)] for path in good)
    for name in bad:
        assert "answer" not in lines[name] and name in lines[name]["error"] and "\n" not in lines[name]["error"]
    assert memory.growth_mb < 200  # decoding the 400-megapixel bomb alone would take 400 MB, 1.2 GB as RGB


def test_a_prompt_file_of_ten_thousand_questions_is_refused_in_one_line_in_bounded_memory(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 1)
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(f"Question {number}: what is in the image?" for number in range(10_000)))
    output = tmp_path / "captions.jsonl"

    with PeakResidentMemory() as memory, pytest.raises(UserError) as refusal:
        run_caption(tiny_saved_dir, tmp_path / "images", output, "--prompt-file", questions)

    message = str(refusal.value)
    assert message.startswith(f"--prompt-file {questions}: The prompt takes ") and "\n" not in message
    assert "more than the model's 2048-token context" in message
    assert not output.exists()
    assert memory.growth_mb < 200


def test_a_prompt_file_holds_the_question_for_every_image(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 1)
    question = tmp_path / "question.txt"
    question.write_text("What is unusual\nabout this image?\n")
    output = tmp_path / "captions.jsonl"

    run_caption(tiny_saved_dir, tmp_path / "images", output, "--prompt-file", question)

    (line,) = read_lines(output)
    assert line["prompt"] == "What is unusual\nabout this image?" and "answer" in line


def test_glob_matches_are_captioned_and_non_images_among_them_get_errors(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images" / "sub", 1)
    (tmp_path / "images" / "sub" / "notes.txt").write_text("hello")
    output = tmp_path / "captions.jsonl"

    run_caption(tiny_saved_dir, f"{tmp_path}/images/**/*", output)

    lines = read_lines(output)
    assert [os.path.basename(line["image"]) for line in lines] == ["image_000.png", "notes.txt"]
    assert "answer" in lines[0] and "error" in lines[1]


def test_a_missing_images_folder_is_a_clear_error(tiny_saved_dir, tmp_path):
    with pytest.raises(UserError, match="no such folder or file"):
        run_caption(tiny_saved_dir, tmp_path / "nowhere", tmp_path / "out.jsonl")


def test_a_folder_without_images_is_a_clear_error(tiny_saved_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No image files in the folder"):
        run_caption(tiny_saved_dir, tmp_path / "empty", tmp_path / "out.jsonl")


def test_rerun_skips_finished_images_and_drops_a_torn_last_line(tiny_saved_dir, tmp_path):
    paths = make_images(tmp_path / "images", 4)
    output = tmp_path / "captions.jsonl"
    earlier = [{"image": path, "prompt": "p", "answer": "from the earlier run", "generation": {}} for path in paths[:2]]
    with open(output, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in earlier)
        file.write('{"image": "' + paths[2] + '", "prompt": "Descr')  # killed while writing

    assert run_caption(tiny_saved_dir, tmp_path / "images", output) == 0

    lines = read_lines(output)
    assert lines[:2] == earlier
    assert [line["image"] for line in lines] == paths
    assert all(line["answer"] != "from the earlier run" for line in lines[2:])


def test_rerun_with_everything_done_writes_nothing(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 2)
    output = tmp_path / "captions.jsonl"
    run_caption(tiny_saved_dir, tmp_path / "images", output)
    before = output.read_bytes()
    run_caption(tiny_saved_dir, tmp_path / "images", output)
    assert output.read_bytes() == before


def test_retry_errors_tries_previously_unreadable_images_again(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 1)
    fixed = tmp_path / "images" / "later.png"
    fixed.write_text("broken for now")
    output = tmp_path / "captions.jsonl"
    run_caption(tiny_saved_dir, tmp_path / "images", output)
    Image.new("RGB", (32, 32), "red").save(fixed)

    run_caption(tiny_saved_dir, tmp_path / "images", output)
    assert len(read_lines(output)) == 2  # plain re-run: the error line counts as done
    run_caption(tiny_saved_dir, tmp_path / "images", output, "--retry-errors")

    later_lines = [line for line in read_lines(output) if line["image"] == str(fixed)]
    assert "error" in later_lines[0] and "answer" in later_lines[1]


def test_a_broken_line_inside_the_output_is_refused(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 1)
    output = tmp_path / "captions.jsonl"
    output.write_text('{"image": "a.png", "answer": "x"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not a caption line"):
        run_caption(tiny_saved_dir, tmp_path / "images", output)


def test_ctrl_c_keeps_every_written_line_and_a_rerun_finishes_the_rest(tiny_saved_dir, tmp_path):
    paths = make_images(tmp_path / "images", 30)
    output = tmp_path / "captions.jsonl"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "caption.py"), "--model", str(tiny_saved_dir),
               "--images", str(tmp_path / "images"), "--output", str(output), "--batch-size", "1",
               "--max-new-tokens", "16"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not output.exists() or output.read_text().count("\n") < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    interrupted = read_lines(output)  # every line is whole JSON
    assert 2 <= len(interrupted) < len(paths)

    assert run_caption(tiny_saved_dir, tmp_path / "images", output) == 0
    lines = read_lines(output)
    assert lines[: len(interrupted)] == interrupted
    assert [line["image"] for line in lines] == paths
