#!/usr/bin/env python
"""
Evaluate a MiniGPT-4 checkpoint (a converted folder or a Hub id) on benchmarks, and put the scores in its model card.

MiniGPT-v2's own protocol (its prompts, greedy decoding, its answer clean-up and scoring), on Hugging Face datasets:

    minigpt4-evaluate --model PATH_OR_ID --suite minigpt-v2 --tasks refcoco --data refcoco=DATASET --split val \\
        --column expression=sentence --output-dir eval/
    minigpt4-evaluate --model PATH_OR_ID --suite minigpt-v2 --tasks okvqa,gqa \\
        --data okvqa=lmms-lab-encoder/OK-VQA --data gqa=GQA_FOLDER --output-dir eval/ --update-card

lmms-eval benchmarks, run in this process through MiniGPT-4's lmms-eval model (its result files are kept under
OUTPUT_DIR/lmms-eval/):

    minigpt4-evaluate --model PATH_OR_ID --suite lmms-eval --tasks mme,pope,seedbench --output-dir eval/

Tasks of the minigpt-v2 suite: refcoco, refcoco+, refcocog (MiniGPT-v2 only), okvqa, gqa, vizwiz, vsr, iconvqa, hm,
coco_caption. Each reads an image column `image` and its own columns (--column NAME=COLUMN renames them; see
docs/evaluation.md for every task's columns and accepted layouts).

Predictions are journaled batch by batch under OUTPUT_DIR/journal/: run the same command again after an
interruption and it continues where it stopped. Writes OUTPUT_DIR/TASK-SPLIT.predictions.jsonl (every row with its
answer and score) and OUTPUT_DIR/summary.json (every score of every run into that folder). --update-card writes the
scores into the model card (model-index + a table beside the published figures); --push-to-hub uploads the card.
"""

import argparse
import json
import sys
from pathlib import Path

from minigpt4_hf.cli.options import (
    EXIT_FAILED,
    CommandLineParser,
    UserError,
    add_model_arguments,
    model_loading_kwargs,
    positive_int,
    run_main,
)
from minigpt4_hf.evaluation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from minigpt4_hf.files import write_text_atomically
from minigpt4_hf.inputs import check_model_path


PROG = "minigpt4-evaluate"
SUITES = ("minigpt-v2", "lmms-eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--suite", choices=SUITES, required=True, help="MiniGPT-v2's protocol or lmms-eval.")
    parser.add_argument("--tasks", required=True, help="Comma-separated task names of the suite.")
    parser.add_argument("--output-dir", required=True, type=Path,
                        help="Folder of the journals, predictions, summary.json (and lmms-eval's result files).")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="Questions per generate() call (default: %(default)s, as the original eval config).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"Answer length limit (default: {DEFAULT_MAX_NEW_TOKENS} for minigpt-v2, as the original "
                             "eval config; for lmms-eval each task's own setting, else 300).")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="Evaluate only the first N rows of each task: a quick check, not a benchmark score "
                             "(default: every row).")

    v2 = parser.add_argument_group("minigpt-v2 suite")
    v2.add_argument("--data", action="append", default=[], metavar="[TASK=]SOURCE",
                    help="A task's dataset: a Hub dataset id, a save_to_disk folder, a data folder or a "
                         ".jsonl/.json/.csv/.parquet file; once per task, TASK= may be left out with one task "
                         "(default: none).")
    v2.add_argument("--split", action="append", default=[], metavar="[TASK=]SPLIT",
                    help="The split to evaluate (needed when the source has several) and its name in the results "
                         "(default: the only split; test for a data file).")
    v2.add_argument("--column", action="append", default=[], metavar="[TASK.]NAME=COLUMN",
                    help="Read the task's column NAME (image, id, question, answers, ...) from COLUMN (default: "
                         "the column named NAME).")
    v2.add_argument("--image-root", default=None,
                    help="Folder that relative image paths in the data are under (default: the data's folder).")
    v2.add_argument("--box-format", choices=("xywh", "xyxy"), default="xywh",
                    help="Ground-truth boxes as x, y, width, height (COCO, RefCOCO) or x1, y1, x2, y2 "
                         "(default: %(default)s).")
    v2.add_argument("--caption-tokenizer", choices=("ptb", "simple"), default="ptb",
                    help="Caption tokenisation before CIDEr: ptb (COCO's, needs Java) or simple (Python) "
                         "(default: %(default)s).")

    lmms = parser.add_argument_group("lmms-eval suite")
    lmms.add_argument("--include-path", action="append", default=[], metavar="DIR",
                      help="A folder of lmms-eval task YAML files to add to its own tasks; repeatable (default: "
                           "none).")
    lmms.add_argument("--task-identifier", default="auto",
                      help="MiniGPT-v2's task identifier in lmms-eval prompts: auto ([caption] for captioning tasks, "
                           "[vqa] otherwise), none, or one of vqa, caption, grounding, refer, detection, identify "
                           "(default: %(default)s).")

    card = parser.add_argument_group("model card")
    card.add_argument("--update-card", action="store_true",
                      help="Write the scores into the model card: MODEL/README.md for a folder, OUTPUT_DIR/README.md "
                           "(from the Hub card) for a Hub id (default: off).")
    card.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                      help="Upload the updated card as README.md of this Hub model repo; implies --update-card "
                           "(default: none).")
    args = parser.parse_args(argv)

    if args.suite == "lmms-eval":
        for flag, value in (("--data", args.data), ("--split", args.split), ("--column", args.column),
                            ("--image-root", args.image_root)):
            if value:
                parser.error(f"{flag} is for --suite minigpt-v2; lmms-eval tasks name their own data")
    elif args.include_path:
        parser.error("--include-path is for --suite lmms-eval")
    if args.push_to_hub:
        args.update_card = True
    return args


def per_task_values(items: list[str], task_names: list[str], flag: str) -> dict[str, str]:
    """`[TASK=]VALUE` flags -> `{task: value}`; a value without TASK= applies to the only task."""
    values: dict[str, str] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if equals and name in task_names:
            values[name] = value
        elif len(task_names) == 1:
            values[task_names[0]] = item
        else:
            raise UserError(f"{flag} {item!r}: with several tasks write {flag} TASK=VALUE ({', '.join(task_names)}).")
    return values


def check_task_identifier(choice: str) -> None:
    from processing_minigpt4 import TASK_IDENTIFIERS

    if choice not in ("auto", "none", *TASK_IDENTIFIERS):
        raise UserError(f"--task-identifier {choice!r}: use auto, none or one of {', '.join(TASK_IDENTIFIERS)}.")


def check_lmms_eval_installed() -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        raise UserError(
            "--suite lmms-eval needs lmms-eval: pip install --no-deps 'lmms-eval==0.7.3' && pip install "
            "'minigpt4-hf[eval]' (its own requirements would replace torch; see docs/evaluation.md)."
        ) from None


def read_model_config(model: str):
    """The checkpoint's config (before any weight is loaded): its variant decides prompts and allowed tasks."""
    from configuration_minigpt4 import MiniGPT4Config

    try:
        return MiniGPT4Config.from_pretrained(model)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(
            f"--model {model}: could not read a MiniGPT-4 config.json ({error}). Give a converted model folder or a "
            "Hub id."
        ) from None


def check_same_model(output_dir: Path, model: str) -> None:
    """An output folder holds one model's results: another model's summary there is a `UserError`."""
    from minigpt4_hf.evaluation import read_summary

    previous = read_summary(output_dir).get("model")
    if previous is not None and previous != model:
        raise UserError(
            f"--output-dir {output_dir} holds results of --model {previous}; use another --output-dir for {model}."
        )


def check_same_settings(path: Path, settings: dict) -> None:
    """A journal continues only with the settings it was started with (else its answers would mix two setups)."""
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != settings:
            keys = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
            changed = ", ".join(f"{key} {previous.get(key)!r} -> {settings.get(key)!r}" for key in keys)
            raise UserError(
                f"{path.parent} holds predictions made with other settings ({changed}); use another --output-dir, "
                f"or delete {path.name.removesuffix('.settings.json')}.jsonl and {path.name} there to start over."
            )


def model_label(model: str) -> str:
    """How summaries name the model: the absolute path of a folder, else the Hub id."""
    return str(Path(model).resolve()) if Path(model).exists() else model


# ---------------------------------------------------------------------------------------------------------------------


def prepare_minigpt_v2(args, variant: str) -> list:
    """
    Checks tasks, data, columns and references (before the model is loaded); returns
    `(TaskRun, dataset, items, dataset_type)` per task.
    """
    from minigpt4_hf import evaluation

    tasks = evaluation.parse_task_names(args.tasks)
    evaluation.check_variant_supports(tasks, variant)
    evaluation.check_scorer_available(tasks, args.caption_tokenizer)
    names = [task.name for task in tasks]
    sources = per_task_values(args.data, names, "--data")
    missing = [name for name in names if name not in sources]
    if missing:
        raise UserError(f"no --data for {', '.join(missing)}; give --data TASK=SOURCE for each task.")
    splits = per_task_values(args.split, names, "--split")
    mappings = evaluation.parse_column_mapping(args.column, tasks)
    prepared = []
    for task in tasks:
        source = sources[task.name]
        dataset = evaluation.load_benchmark_dataset(source, splits.get(task.name))
        evaluation.check_columns(task, dataset.column_names, mappings[task.name], source)
        run = evaluation.TaskRun(
            task=task, split=splits.get(task.name) or str(dataset.split or "test"),
            mapping=mappings[task.name], variant=variant, box_format=args.box_format,
            image_root=args.image_root or default_image_root(source),
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or evaluation.DEFAULT_MAX_NEW_TOKENS,
            limit=args.limit,
        )
        items = evaluation.plan_items(dataset, run)
        check_same_settings(settings_path(args.output_dir, run), run_settings(run))
        prepared.append((run, dataset, items, evaluation.dataset_type_for(source, task.dataset_type)))
    return prepared


def default_image_root(source: str) -> str | None:
    """Where relative image paths of local data are read: the data file's folder, or the data folder."""
    path = Path(source)
    if path.is_file():
        return str(path.parent)
    return str(path) if path.is_dir() else None


def run_settings(run) -> dict:
    """What a task's predictions depend on besides the model and the rows (a journal continues only with these)."""
    return {"max_new_tokens": run.max_new_tokens, "box_format": run.box_format, "variant": run.variant,
            "decoding": "greedy"}


def journal_path(output_dir: Path, run) -> Path:
    return output_dir / "journal" / f"{run.key}.jsonl"


def settings_path(output_dir: Path, run) -> Path:
    return output_dir / "journal" / f"{run.key}.settings.json"


def run_minigpt_v2(args, prepared: list, model, processor) -> dict[str, dict]:
    from minigpt4_hf import evaluation
    from minigpt4_hf.journal import Journal

    entries = {}
    for run, dataset, items, dataset_type in prepared:
        settings = run_settings(run)
        write_text_atomically(settings_path(args.output_dir, run), json.dumps(settings) + "\n")
        with Journal(journal_path(args.output_dir, run), key="id", what="prediction record") as journal:
            records = evaluation.run_task(model, processor, dataset, run, items, journal)
        scores = evaluation.score_task(run.task, records, processor, args.caption_tokenizer)
        evaluation.write_task_outputs(args.output_dir, run, records, scores)
        entries[f"minigpt-v2/{run.task.name}/{run.split}"] = evaluation.summary_entry(
            run, scores, records, dataset_type, {**settings, "batch_size": run.batch_size, "limit": run.limit,
                                                 "caption_tokenizer": args.caption_tokenizer}
        )
        shown = ", ".join(f"{name} {value:.2f}" for name, value in scores["metrics"].items())
        print(f"{run.key}: {shown} ({len(records)} items)", file=sys.stderr)
    return entries


def run_lmms(args, manager, task_names: list[str], model, processor) -> dict[str, dict]:
    from minigpt4_hf.journal import Journal
    from minigpt4_hf.lmms_eval_model import MiniGPT4LmmsModel, run_lmms_eval, summary_entries

    with Journal(args.output_dir / "journal" / "lmms-eval.jsonl", key="key", what="lmms-eval response record") \
            as journal:
        lm = MiniGPT4LmmsModel(model, processor, journal, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, task_identifier=args.task_identifier)
        results = run_lmms_eval(lm, task_names, manager, args.output_dir, limit=args.limit,
                                model_args=f"pretrained={args.model}")
    entries = summary_entries(results)
    for entry in entries.values():
        shown = ", ".join(f"{name} {value:.4g}" for name, value in entry["metrics"].items())
        print(f"{entry['task']}: {shown}", file=sys.stderr)
    return entries


def update_card(args, config, summary: dict) -> int:
    """
    Writes the summary's scores into the model card (and uploads it with --push-to-hub). Returns the exit status: 1
    when the Hub could not be reached (the scores stay in summary.json, the folder's card stays written).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from minigpt4_hf import evaluation

    folder = Path(args.model)
    if folder.is_dir():
        card_path = folder / "README.md"
        card = ModelCard.load(card_path) if card_path.exists() else None
    else:
        card_path = args.output_dir / "README.md"
        try:
            card = ModelCard.load(args.model)
        except Exception as error:  # noqa: BLE001 (network, authentication, no card)
            print(f"{PROG}: could not fetch the model card of {args.model} ({type(error).__name__}: {error}); the "
                  f"scores are in {args.output_dir / evaluation.SUMMARY_FILE}.", file=sys.stderr)
            return EXIT_FAILED
    if card is None:
        card = ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n\n# {folder.name}\n")
    evaluation.update_model_card(card, summary, evaluation.model_key(config), card.data.model_name or folder.name)
    write_text_atomically(card_path, str(card))
    print(f"Wrote the scores into {card_path}.", file=sys.stderr)
    if args.push_to_hub:
        try:
            url = evaluation.push_card(str(card), args.push_to_hub)
        except Exception as error:  # noqa: BLE001 (network, authentication, permissions)
            print(f"{PROG}: --push-to-hub {args.push_to_hub}: the upload failed ({type(error).__name__}: {error}). "
                  f"Retry with `hf upload {args.push_to_hub} {card_path} README.md`.", file=sys.stderr)
            return EXIT_FAILED
        print(f"Pushed the card to {args.push_to_hub}: {url}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)
    config = read_model_config(args.model)
    variant = getattr(config, "variant", "vicuna0")
    check_same_model(args.output_dir, model_label(args.model))

    if args.suite == "minigpt-v2":
        prepared = prepare_minigpt_v2(args, variant)
    else:
        check_task_identifier(args.task_identifier)
        check_lmms_eval_installed()
        from minigpt4_hf.lmms_eval_model import lmms_eval_tasks

        names = [name.strip() for name in args.tasks.split(",") if name.strip()]
        if not names:
            raise UserError("--tasks is empty; name lmms-eval tasks, e.g. --tasks mme,pope.")
        manager, task_names = lmms_eval_tasks(names, args.include_path)

    from minigpt4_hf.inference import load_model_and_processor

    model, processor = load_model_and_processor(args.model, **model_loading_kwargs(args))
    if args.suite == "minigpt-v2":
        entries = run_minigpt_v2(args, prepared, model, processor)
    else:
        entries = run_lmms(args, manager, task_names, model, processor)

    from minigpt4_hf.evaluation import update_summary

    summary = update_summary(args.output_dir, model_label(args.model), entries)
    print(f"Wrote {args.output_dir / 'summary.json'}.", file=sys.stderr)
    return update_card(args, config, summary) if args.update_card else 0


def cli() -> None:
    """Console entry point `minigpt4-evaluate`."""
    run_main(main, PROG)


if __name__ == "__main__":
    cli()
