"""
minigpt4-evaluate: MiniGPT-v2's benchmark protocol on local datasets, lmms-eval with a local task, REC / VQA /
caption scoring, resuming a killed run, and the scores in the model card.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

import minigpt4_hf.cli.evaluate as evaluate
from minigpt4_hf import evaluation
from minigpt4_hf.evaluation import TASKS, box_iou, rec_box, reference_of, score_record, update_model_card
from minigpt4_hf.random_models import build_random_model
from conftest import REPO_ROOT


datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models and datasets.


@pytest.fixture(scope="module")
def v2_processor(tiny_v2_saved_dir):
    from processing_minigpt4 import MiniGPT4Processor

    return MiniGPT4Processor.from_pretrained(tiny_v2_saved_dir)


def images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (60 + 10 * i, 40 + 5 * i), (40 * i % 256, 120, 200)) for i in range(count)]


def saved_dataset(folder: Path, rows: int = 3) -> Path:
    """Layout A: a `save_to_disk` folder, images as an Image feature, answers as lists of strings, boxes as xywh,
    0/1 labels, choice answers as indices, several reference captions."""
    data = datasets.Dataset.from_dict({
        "image": images(rows),
        "question": [f"what colour is thing {i}?" for i in range(rows)],
        "answers": [["blue"] * 10 for _ in range(rows)],
        "text": ["a meme text"] * rows,
        "label": [i % 2 for i in range(rows)],
        "choices": [["red", "blue", "green"]] * rows,
        "answer": [1] * rows,
        "captions": [["a blue square", "a blue box"]] * rows,
    }).cast_column("image", datasets.Image())
    data.save_to_disk(str(folder))
    return folder


def jsonl_dataset(folder: Path, rows: int = 3) -> Path:
    """Layout B: a JSON-lines file with image paths relative to it, several referring expressions per object in a
    column of another name, boxes as xyxy, answers as lists of {"answer": ...} dicts, "true"/"false" labels, choice
    answers as text."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, image in enumerate(images(rows)):
        image.save(folder / f"img{index}.png")
        lines.append({"file": f"img{index}.png", "sentence": [f"the thing number {index}", "the other one"],
                      "bbox": [5, 4, 30, 20],
                      "question": "is it blue?", "answers": [{"answer": "yes", "answer_id": k} for k in range(10)],
                      "caption": "the box is left of the circle", "label": "true", "choices": ["yes", "no"],
                      "answer": "yes"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def run(model_dir, output_dir, *flags) -> int:
    return evaluate.main(["--model", str(model_dir), "--output-dir", str(output_dir), "--max-new-tokens", "3",
                          *map(str, flags)])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def bad_input(capsys, *argv) -> str:
    """Runs the tool's entry point on bad input: exit status 2 and the one-line error, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.run_main(lambda: evaluate.main(list(map(str, argv))), "minigpt4-evaluate")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt4-evaluate: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input.


def test_an_unknown_task_is_one_line_naming_the_known_tasks(tiny_saved_dir, tmp_path, capsys):
    message = bad_input(capsys, "--model", tiny_saved_dir, "--suite", "minigpt-v2", "--tasks", "okvqa,textvqa",
                        "--data", tmp_path, "--output-dir", tmp_path / "out")
    assert "textvqa" in message and all(name in message for name in TASKS)


def test_a_dataset_without_the_needed_columns_names_them_and_the_column_flag(tiny_saved_dir, tmp_path, capsys):
    data = saved_dataset(tmp_path / "data")
    message = bad_input(capsys, "--model", tiny_saved_dir, "--suite", "minigpt-v2", "--tasks", "vsr",
                        "--data", data, "--output-dir", tmp_path / "out")
    assert "'caption'" in message and "--column" in message
    assert not (tmp_path / "out").exists()


def test_missing_data_is_one_line_naming_the_flag(tiny_saved_dir, tmp_path, capsys):
    message = bad_input(capsys, "--model", tiny_saved_dir, "--suite", "minigpt-v2", "--tasks", "gqa",
                        "--data", tmp_path / "missing", "--output-dir", tmp_path / "out")
    assert "--data" in message and "no such folder or file" in message


def test_a_box_task_on_a_model_that_cannot_ground_is_refused_before_loading_data(tiny_saved_dir, tmp_path, capsys):
    message = bad_input(capsys, "--model", tiny_saved_dir, "--suite", "minigpt-v2", "--tasks", "refcoco",
                        "--data", tmp_path / "no-such-data", "--output-dir", tmp_path / "out")
    assert "refcoco" in message and "'vicuna0'" in message and "no-such-data" not in message


def test_the_lmms_eval_suite_without_lmms_eval_says_how_to_install_it(tiny_saved_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as if it were not installed
    message = bad_input(capsys, "--model", tiny_saved_dir, "--suite", "lmms-eval", "--tasks", "mme",
                        "--output-dir", tmp_path / "out")
    assert "pip install --no-deps 'lmms-eval==0.7.3'" in message


def test_an_unreadable_reference_is_refused_before_the_model_loads(tiny_saved_dir, tmp_path, capsys, monkeypatch):
    import minigpt4_hf.inference

    monkeypatch.setattr(minigpt4_hf.inference, "load_model_and_processor",
                        lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = saved_dataset(tmp_path / "data")  # its "answer" column is an index; read as the choice's text it fails
    message = bad_input(capsys, "--model", tiny_saved_dir, "--suite", "minigpt-v2", "--tasks",
                        "iconvqa", "--data", data, "--column", "answer=text", "--output-dir", tmp_path / "out")
    assert "row 0" in message and "a meme text" in message


# ---------------------------------------------------------------------------------------------------------------------
# The MiniGPT-v2 protocol end to end.


def test_a_v1_model_answers_vqa_tasks_and_writes_predictions_and_a_summary(tiny_saved_dir, tmp_path):
    data = saved_dataset(tmp_path / "data")
    out = tmp_path / "out"

    status = run(tiny_saved_dir, out, "--suite", "minigpt-v2", "--tasks", "okvqa,iconvqa,hm", "--data",
                 f"okvqa={data}", "--data", f"iconvqa={data}", "--data", f"hm={data}", "--split", "okvqa=val",
                 "--batch-size", 2)

    assert status == 0
    okvqa = read_jsonl(out / "okvqa-val.predictions.jsonl")
    assert [row["id"] for row in okvqa] == ["0", "1", "2"]
    # Vicuna-v1 never saw MiniGPT-v2's task identifiers: the instruction comes bare.
    assert okvqa[0]["instruction"] == "Based on the image, respond to this question with a short answer: " \
                                      "what colour is thing 0?"
    assert all(isinstance(row["prediction"], str) and 0 <= row["score"] <= 1 for row in okvqa)
    iconqa = read_jsonl(out / "iconvqa-test.predictions.jsonl")
    assert all(row["prediction"] == ["red", "blue", "green"][row["choice"]] and len(row["losses"]) == 3
               for row in iconqa)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"minigpt-v2/okvqa/val", "minigpt-v2/iconvqa/test", "minigpt-v2/hm/test"}
    hm = summary["results"]["minigpt-v2/hm/test"]
    scored = read_jsonl(out / "hm-test.predictions.jsonl")
    assert hm["metrics"]["accuracy"] == pytest.approx(100 * sum(row["score"] for row in scored) / 3)
    assert hm["settings"]["max_new_tokens"] == 3 and hm["settings"]["decoding"] == "greedy"


def test_a_v2_model_scores_refcoco_from_a_jsonl_layout_with_a_column_mapping(tiny_v2_saved_dir, tmp_path):
    data = jsonl_dataset(tmp_path / "refs")
    out = tmp_path / "out"

    status = run(tiny_v2_saved_dir, out, "--suite", "minigpt-v2", "--tasks", "refcoco,vsr,vizwiz", "--data",
                 f"refcoco={data}", "--data", f"vsr={data}", "--data", f"vizwiz={data}", "--column", "image=file",
                 "--column", "refcoco.expression=sentence", "--box-format", "xyxy")

    assert status == 0
    rows = read_jsonl(out / "refcoco-test.predictions.jsonl")
    assert [row["id"] for row in rows] == ["0:0", "0:1", "1:0", "1:1", "2:0", "2:1"]  # one item per expression
    assert rows[2]["instruction"] == "[refer] give me the location of the thing number 1"
    assert rows[3]["instruction"] == "[refer] give me the location of the other one"
    assert rows[2]["reference"] == {"box": [5.0, 4.0, 30.0, 20.0]}
    assert rows[2]["image_size"] == [70, 45]
    assert read_jsonl(out / "vsr-test.predictions.jsonl")[0]["instruction"].startswith(
        "[vqa] Based on the image, is this statement true or false? the box is")
    vizwiz = json.loads((out / "summary.json").read_text())["results"]["minigpt-v2/vizwiz/test"]
    assert set(vizwiz["metrics"]) == {"accuracy", "accuracy_minigptv2_script"}


def test_a_killed_run_resumes_without_losing_or_redoing_finished_predictions(tiny_saved_dir, tmp_path):
    rows = 12
    data = saved_dataset(tmp_path / "data", rows=rows)
    out = tmp_path / "out"
    journal = out / "journal" / "gqa-test.jsonl"
    flags = ["--model", str(tiny_saved_dir), "--output-dir", str(out), "--max-new-tokens", "6", "--suite",
             "minigpt-v2", "--tasks", "gqa", "--data", str(data)]
    process = subprocess.Popen([sys.executable, "-m", "minigpt4_hf.cli.evaluate", *flags, "--batch-size", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 2):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed = journal.read_bytes()
    finished = killed[: killed.rfind(b"\n") + 1].decode().splitlines()
    assert process.returncode == -signal.SIGKILL and 2 <= len(finished) < rows

    assert evaluate.main([*flags, "--batch-size", str(rows)]) == 0

    after = journal.read_text().splitlines()
    assert after[: len(finished)] == finished  # every finished prediction kept as it was
    assert sorted(int(json.loads(line)["id"]) for line in after) == list(range(rows))  # and none redone
    assert [row["id"] for row in read_jsonl(out / "gqa-test.predictions.jsonl")] == [str(i) for i in range(rows)]


def test_resuming_with_other_settings_is_refused(tiny_saved_dir, tmp_path, capsys):
    data = saved_dataset(tmp_path / "data", rows=1)
    out = tmp_path / "out"
    flags = ["--model", tiny_saved_dir, "--suite", "minigpt-v2", "--tasks", "hm", "--data", data,
             "--output-dir", out]
    assert evaluate.main([*map(str, flags), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    message = bad_input(capsys, *flags, "--max-new-tokens", "4")
    assert "max_new_tokens 2 -> 4" in message


@pytest.mark.parametrize("variant, end", [("vicuna0", "###"), ("v2", "</s>")])
def test_choices_are_ranked_with_the_originals_answer_end(variant, end):
    model, processor = build_random_model("tiny", variant=variant)

    assert evaluation.answer_end_text(model, processor) == end  # `end_sym` of each original config


# ---------------------------------------------------------------------------------------------------------------------
# REC scoring on hand-made answers (eval_ref.py's rules; boxes read by the processor).


def rec_record(answer: str, box_xyxy, image_size=(100, 100)) -> dict:
    return {"prediction": answer, "reference": {"box": list(box_xyxy)}, "image_size": list(image_size)}


def test_the_exact_box_in_grid_units_is_correct(v2_processor):
    box = (30.0, 20.0, 150.0, 90.0)
    answer = v2_processor.format_box(box, (200, 100))

    scored = score_record(TASKS["refcoco"], rec_record(answer, box, (200, 100)), v2_processor)

    assert scored["score"] == 1.0 and scored["iou"] == pytest.approx(1.0)


@pytest.mark.parametrize("right, expected_iou, correct", [(48, 0.49, False), (50, 0.51, True)])
def test_iou_049_is_wrong_and_051_is_right(v2_processor, right, expected_iou, correct):
    # On a 100 x 100 image one grid unit is one pixel; with the +1 pixel convention a box of columns 0..right
    # against the ground truth 0..99 has IoU (right + 1) / 100.
    scored = score_record(TASKS["refcoco"], rec_record(f"{{<0><0><{right}><99>}}", (0, 0, 99, 99)), v2_processor)

    assert scored["iou"] == pytest.approx(expected_iou)
    assert scored["score"] == float(correct)


@pytest.mark.parametrize("answer", [
    "", "a cat on the left", "{<10><10><50>}", "{<10><10><50><60>", "{<10><x><50><60>}", "{<10><10><50><60><70>}",
    "<p>cat</p> {<10><10><50><60>}", "the cat {<10><10><50><60>}", "{<10><10><500><60>}",
])
def test_malformed_or_late_box_text_is_wrong_not_an_error(v2_processor, answer):
    scored = score_record(TASKS["refcoco"], rec_record(answer, (10, 10, 50, 60)), v2_processor)

    assert scored["score"] == 0.0 and scored["box"] is None


def test_spaces_and_unk_in_a_box_answer_are_removed_before_reading(v2_processor):
    assert rec_box(" { <10> <20> <50><60> } <unk>", (200, 100), v2_processor) == (20.0, 20.0, 100.0, 60.0)


def test_box_iou_uses_the_plus_one_pixel_convention():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


# ---------------------------------------------------------------------------------------------------------------------
# VQA, yes/no, true/false, exact-match and caption scoring.


def test_vqa_accuracy_is_the_standard_soft_score_after_normalisation():
    answers = ["two"] * 3 + ["three"] * 7
    # Each of the 3 "two" left out leaves 2 matches (2/3); each "three" left out leaves 3 (1): (3 * 2/3 + 7) / 10.
    assert evaluation.vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert evaluation.vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert evaluation.vqa_accuracy("four", answers) == 0.0


def test_vizwiz_keeps_the_original_scripts_unnormalised_score_beside_the_vqa_accuracy():
    record = {"prediction": "2", "reference": {"answers": ["two"] * 10}}

    scored = score_record(TASKS["vizwiz"], record)

    assert scored["score"] == 1.0 and scored["minigptv2_script_score"] == 0.0


@pytest.mark.parametrize("task, prediction, reference, score", [
    ("gqa", " Left <unk>", {"answer": "left"}, 1.0),
    ("gqa", "on the left", {"answer": "left"}, 0.0),
    ("vsr", "True", {"label": True}, 1.0),
    ("vsr", "true", {"label": False}, 0.0),
    ("hm", "Yes", {"label": True}, 1.0),
    ("hm", "no", {"label": True}, 0.0),
    ("hm", "maybe", {"label": False}, 0.0),  # neither yes nor no: wrong, as the original counted it
])
def test_short_answer_scorers_follow_the_original_rules(task, prediction, reference, score):
    assert score_record(TASKS[task], {"prediction": prediction, "reference": reference})["score"] == score


@pytest.mark.parametrize("task, row, expected", [
    ("okvqa", {"answers": ["a", "b"]}, {"answers": ["a", "b"]}),
    ("okvqa", {"answers": [{"answer": "a", "answer_id": 1}]}, {"answers": ["a"]}),
    ("okvqa", {"answers": "a"}, {"answers": ["a"]}),
    ("refcoco", {"bbox": [10, 20, 30, 40]}, {"box": [10.0, 20.0, 40.0, 60.0]}),
    ("vsr", {"label": "false"}, {"label": False}),
    ("hm", {"label": 1}, {"label": True}),
    ("iconvqa", {"choices": ["x", "y"], "answer": "y"}, {"answer": 1}),
    ("iconvqa", {"choices": ["x", "y"], "answer": "0"}, {"answer": 0}),
    ("iconvqa", {"choices": "x,y", "answer": "y"}, {"answer": 1}),
    ("coco_caption", {"captions": "one caption"}, {"captions": ["one caption"]}),
])
def test_each_reference_layout_reads_the_same(task, row, expected):
    assert reference_of(TASKS[task], row, "xywh") == expected


def test_an_image_column_may_hold_bytes_a_path_or_a_bytes_dict(tmp_path):
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    image.save(tmp_path / "a.png")
    encoded = (tmp_path / "a.png").read_bytes()
    for value, root in ((encoded, None), ("a.png", tmp_path), ({"bytes": encoded, "path": None}, None),
                        ({"bytes": None, "path": str(tmp_path / "a.png")}, None)):
        assert evaluation.open_row_image(value, root).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=pytest.mark.skipif(
    shutil.which("java") is None, reason="COCO's PTB tokenizer needs Java"))])
def test_cider_ranks_the_reference_caption_above_an_unrelated_one(tokenizer):
    references = {"1": ["a dog runs on the grass", "a brown dog running"], "2": ["a red car on a street"],
                  "3": ["two people eat pizza", "people eating a pizza"]}
    right = {"1": "A dog runs on the grass.", "2": "a red car on a street", "3": "two people eat pizza"}
    wrong = {"1": "a red car on a street", "2": "two people eat pizza", "3": "a dog runs on the grass"}

    assert evaluation.cider_score(right, references, tokenizer) > evaluation.cider_score(wrong, references, tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# lmms-eval with a local task definition.

LOCAL_TASKS = {
    "utils.py": '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answers"][0])}


def doc_to_choice(doc):
    return list(doc["choices"])
''',
    "tiny_vqa.yaml": '''
task: tiny_vqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: question
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
''',
    "tiny_choice.yaml": '''
task: tiny_choice
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
''',
}


def test_lmms_eval_runs_a_local_task_definition_and_keeps_its_result_files(tiny_v2_saved_dir, tmp_path):
    pytest.importorskip("lmms_eval")
    data = tmp_path / "data"
    datasets.DatasetDict({"test": datasets.load_from_disk(str(saved_dataset(tmp_path / "flat", rows=2)))}) \
        .save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, text in LOCAL_TASKS.items():
        (tasks / name).write_text(text.replace("{data}", str(data)), encoding="utf-8")
    out = tmp_path / "out"

    status = evaluate.main(["--model", str(tiny_v2_saved_dir), "--suite", "lmms-eval",
                            "--tasks", "tiny_vqa,tiny_choice", "--include-path", str(tasks), "--output-dir", str(out),
                            "--batch-size", "2"])

    assert status == 0
    files = sorted(path.name.split("_", 2)[-1] for path in (out / "lmms-eval").rglob("*.json*"))
    assert files == ["results.json", "samples_tiny_choice.jsonl", "samples_tiny_vqa.jsonl"]
    results = json.loads(next((out / "lmms-eval").rglob("*_results.json")).read_text())
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert summary["lmms-eval/tiny_choice/test"]["metrics"]["acc"] == results["results"]["tiny_choice"]["acc,none"]
    assert summary["lmms-eval/tiny_vqa/test"]["metrics"] == {"exact_match": 0.0}
    # MiniGPT-v2 prompts carry the [vqa] identifier; each response was journaled.
    samples = read_jsonl(next((out / "lmms-eval").rglob("*samples_tiny_vqa.jsonl")))
    assert len(samples) == 2
    assert len(read_jsonl(out / "journal" / "lmms-eval.jsonl")) == 2 + 2 * 3


def test_lmms_eval_prompts_get_the_v2_task_identifier_by_task_kind():
    from minigpt4_hf.lmms_eval_model import task_identifier_for

    assert task_identifier_for("coco_cap_val", "auto", "v2") == "caption"
    assert task_identifier_for("mme", "auto", "v2") == "vqa"
    assert task_identifier_for("mme", "none", "v2") is None
    assert task_identifier_for("mme", "auto", "vicuna0") is None


# ---------------------------------------------------------------------------------------------------------------------
# The model card.


def summary_with(*entries) -> dict:
    return {"results": {f"{e['suite']}/{e['task']}/{e['split']}": e for e in entries}}


def refcoco_entry(split: str, accuracy: float) -> dict:
    return {"suite": "minigpt-v2", "task": "refcoco", "title": "RefCOCO", "split": split,
            "metrics": {"accuracy": accuracy}, "primary_metric": "accuracy", "metric_title": "accuracy (IoU > 0.5)",
            "task_type": "object-detection", "dataset_type": "lmms-lab/RefCOCO"}


def card_with_limitations() -> ModelCard:
    data = ModelCardData(library_name="transformers", license="other", model_name="MiniGPT-v2")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# MiniGPT-v2\n\nUsage.\n\n## Limitations\n\n- Hallucination.\n")


def test_card_metadata_validates_and_round_trips_through_readme_text():
    card = update_model_card(card_with_limitations(), summary_with(refcoco_entry("val", 80.0)), "v2-7b", "x")

    reloaded = ModelCard(str(card))

    (result,) = reloaded.data.eval_results
    assert (result.dataset_name, result.dataset_split, result.metric_type, result.metric_value) == \
           ("RefCOCO", "val", "accuracy", 80.0)
    assert reloaded.data.model_name == "MiniGPT-v2" and reloaded.data.license == "other"
    assert reloaded.data.to_dict()["model-index"] == card.data.to_dict()["model-index"]
    assert reloaded.text.index("## Evaluation") < reloaded.text.index("## Limitations")


def test_card_table_shows_the_published_figure_and_its_source_beside_ours():
    card = update_model_card(card_with_limitations(), summary_with(refcoco_entry("testA", 90.0)), "v2-7b", "x")

    row = next(line for line in card.text.splitlines() if line.startswith("| RefCOCO | testA"))
    assert "| 90.00 | 91.65 | MiniGPT-v2 paper (arXiv 2310.09478)" in row


def test_a_new_score_replaces_the_old_one_and_keeps_the_others():
    card = update_model_card(card_with_limitations(), summary_with(refcoco_entry("val", 1.0), refcoco_entry(
        "testA", 2.0)), "v2-7b", "x")
    card = update_model_card(card, summary_with(refcoco_entry("val", 3.0)), "v2-7b", "x")

    reloaded = ModelCard(str(card))
    assert sorted((r.dataset_split, r.metric_value) for r in reloaded.data.eval_results) == [("testA", 2.0),
                                                                                                ("val", 3.0)]
    assert reloaded.text.count("## Evaluation") == 1


def test_the_docs_list_every_published_figure_with_its_source():
    lines = (REPO_ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8").splitlines()
    for figure in evaluation.PUBLISHED_RESULTS:
        assert any(f"| {figure.split} |" in line and f"| {figure.value} |" in line and figure.source[:40] in line
                   for line in lines), figure


def test_update_card_and_push_to_hub_write_the_folder_card_and_upload_it(tiny_saved_dir, tmp_path, monkeypatch):
    import huggingface_hub

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_saved_dir, model_dir)
    card_with_limitations().save(model_dir / "README.md")
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", lambda self, **kwargs: uploads.append(kwargs) or
                        "https://huggingface.co/me/model/commit/1")
    data = saved_dataset(tmp_path / "data", rows=1)

    status = run(model_dir, tmp_path / "out", "--suite", "minigpt-v2", "--tasks", "hm", "--data", data,
                 "--push-to-hub", "me/model")

    assert status == 0
    card = ModelCard.load(model_dir / "README.md")
    assert [r.dataset_name for r in card.data.eval_results] == ["Hateful Memes"]
    (upload,) = uploads
    assert upload["repo_id"] == "me/model" and upload["path_in_repo"] == "README.md"
    assert upload["path_or_fileobj"].decode("utf-8") == (model_dir / "README.md").read_text(encoding="utf-8")


def test_a_failed_upload_exits_1_and_keeps_the_scores_and_the_card(tiny_saved_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def refuse(self, **kwargs):
        raise OSError("the Hub cannot be reached")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", refuse)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_saved_dir, model_dir)

    status = run(model_dir, tmp_path / "out", "--suite", "minigpt-v2", "--tasks", "hm", "--data",
                 saved_dataset(tmp_path / "data", rows=1), "--push-to-hub", "me/model")

    assert status == 1
    assert "the Hub cannot be reached" in capsys.readouterr().err
    assert [r.dataset_name for r in ModelCard.load(model_dir / "README.md").data.eval_results] == ["Hateful Memes"]
    assert "minigpt-v2/hm/test" in json.loads((tmp_path / "out" / "summary.json").read_text())["results"]
