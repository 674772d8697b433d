"""minigpt4-benchmark's machinery, and the speed-related behaviours of the model that hold without any timing."""

import inspect
import json
import random
import sys

import pytest
import torch
from minigpt4_hf.cli.benchmark import main as benchmark_main
from minigpt4_hf.cli.options import UserError
from minigpt4_hf.benchmark import (
    TARGET_GOALS,
    PeakMemory,
    TokenClock,
    check_target,
    compare_generation,
    fixed_length_generate_kwargs,
    gradient_bytes,
    results_table,
    run_interleaved,
    summarize,
)
from transformers import LogitsProcessorList

from modeling_minigpt4 import MiniGPT4ForConditionalGeneration, MiniGPT4Model, StopOnTokenSequences

PROMPT = "<ImageHere> Describe this image."


def training_batch(processor, image, batch_size=2):
    return processor(
        images=[image] * batch_size,
        text=[PROMPT] * batch_size,
        suffix=["A red square on a wall."] * batch_size,
        return_tensors="pt",
    )


def count_calls(module: torch.nn.Module) -> list:
    """Registers a forward hook that appends the grad mode of every call; returns the list it fills."""
    calls = []
    module.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    return calls


# --------------------------------------------------------------------------------------------------------------------
# Training: frozen parts cost no gradients and no autograd graph.


def test_training_step_allocates_no_gradients_for_frozen_weights(tiny, example_image):
    model, processor = tiny
    model.train()
    model(**training_batch(processor, example_image)).loss.backward()

    held = gradient_bytes(model)
    projection = model.language_projection
    assert held["frozen"] == 0
    assert held["trainable"] == sum(p.numel() * p.element_size() for p in projection.parameters())
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("model.language_projection"))


def test_frozen_vision_model_and_qformer_run_without_autograd_while_training(tiny, example_image):
    model, processor = tiny
    vision_calls, qformer_calls = count_calls(model.vision_model), count_calls(model.qformer)
    model.train()
    outputs = model.get_image_features(training_batch(processor, example_image)["pixel_values"], return_dict=True)

    assert vision_calls == [False] and qformer_calls == [False]
    assert outputs.last_hidden_state.grad_fn is None
    assert outputs.pooler_output.requires_grad  # the projection still trains


def test_switching_the_no_grad_encoders_off_runs_them_in_grad_mode_with_equal_features(tiny, example_image):
    model, processor = tiny
    pixel_values = training_batch(processor, example_image, batch_size=1)["pixel_values"]
    vision_calls = count_calls(model.vision_model)
    with_switch = model.get_image_features(pixel_values)
    model.model.frozen_encoders_without_grad = False
    without_switch = model.get_image_features(pixel_values)

    assert vision_calls == [False, True]
    torch.testing.assert_close(with_switch, without_switch, rtol=0, atol=0)


def test_a_frozen_model_has_no_gradient_bytes_before_any_step(tiny):
    model, _ = tiny
    assert gradient_bytes(model) == {"trainable": 0, "frozen": 0}


# --------------------------------------------------------------------------------------------------------------------
# Generation: image features once, at prefill; the per-token work stays the language model's.


def test_decode_steps_do_not_call_the_vision_model_or_the_qformer(tiny, example_image):
    model, processor = tiny
    vision_calls, qformer_calls = count_calls(model.vision_model), count_calls(model.qformer)
    language_calls = count_calls(model.language_model)
    inputs = processor(images=example_image, text=PROMPT, return_tensors="pt")
    model.generate(**inputs, **fixed_length_generate_kwargs(model, 6))

    assert len(vision_calls) == 1 and len(qformer_calls) == 1
    assert len(language_calls) == 6  # prefill + 5 decode steps


def test_decode_steps_do_not_look_for_image_placeholders(tiny, example_image, monkeypatch):
    model, processor = tiny
    lookups = []
    original = MiniGPT4Model.get_placeholder_mask

    def counting(self, *args, **kwargs):
        lookups.append(args[0].shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MiniGPT4Model, "get_placeholder_mask", counting)
    inputs = processor(images=example_image, text=PROMPT, return_tensors="pt")
    model.generate(**inputs, **fixed_length_generate_kwargs(model, 5))

    assert lookups == [inputs["input_ids"].shape]


def test_forward_lists_the_arguments_generate_passes(tiny):
    model, _ = tiny
    parameters = inspect.signature(model.forward).parameters
    assert list(parameters)[:3] == ["input_ids", "pixel_values", "attention_mask"]
    assert "mm_encoder_outputs" in parameters


def test_stop_criterion_marks_exactly_the_rows_ending_with_a_stop_sequence():
    sequences = [[7], [3, 4], [5, 6, 7, 8]]
    criterion = StopOnTokenSequences(sequences)
    rng = random.Random(0)
    for _ in range(300):
        rows, length = rng.randint(1, 5), rng.randint(1, 6)
        input_ids = torch.tensor([[rng.choice([3, 4, 5, 6, 7, 8]) for _ in range(length)] for _ in range(rows)])
        expected = [any(row[-len(stop) :] == stop for stop in sequences) for row in input_ids.tolist()]
        assert criterion(input_ids, torch.zeros(rows, 10)).tolist() == expected


def test_fixed_length_generation_never_stops_early_and_clocks_every_token(tiny, example_image):
    model, processor = tiny
    inputs = processor(images=[example_image] * 2, text=[PROMPT, "<ImageHere> What?"], return_tensors="pt")
    clock = TokenClock(torch.device("cpu"))
    output = model.generate(
        **inputs, logits_processor=LogitsProcessorList([clock]), **fixed_length_generate_kwargs(model, 12)
    )
    assert output.shape == (2, inputs["input_ids"].shape[1] + 12)
    assert len(clock.stamps) == 12 and clock.stamps == sorted(clock.stamps)


# --------------------------------------------------------------------------------------------------------------------
# Loading in bf16.


def test_loading_in_bf16_keeps_no_fp32_copy_of_any_weight(tiny_saved_dir, tiny_shared):
    loaded = MiniGPT4ForConditionalGeneration.from_pretrained(tiny_saved_dir, dtype=torch.bfloat16)
    fp32_bytes = sum(p.numel() * p.element_size() for p in tiny_shared[0].parameters())

    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}  # Q-Former and query tokens included
    assert sum(p.numel() * p.element_size() for p in loaded.parameters()) * 2 == fp32_bytes
    assert not any(p.requires_grad for p in loaded.vision_model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Measurement machinery.


def test_summarize_reports_median_quartiles_minimum_and_count():
    assert summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "n": 5}


def test_run_interleaved_warms_up_then_rotates_the_order_of_variants():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = run_interleaved(variants, repeats=3, warmup=1, device=torch.device("cpu"))

    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(samples) for name, samples in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_compare_generation_rejects_a_variant_that_stopped_early():
    def short(processors):
        return torch.zeros(1, 5, dtype=torch.long)

    with pytest.raises(RuntimeError, match="expected \\(1, 7\\)"):
        compare_generation({"short": short}, {"short": 1}, {"short": 3}, 4, 1, 0, torch.device("cpu"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident set needs Linux /proc")
def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)
        del block
    assert peak.bytes >= 60 * 1024 * 1024


@pytest.mark.parametrize(
    ("name", "value", "passed"),
    [
        ("decode_tokens_per_s_image_vs_text_lm", 0.98, True),
        ("decode_tokens_per_s_image_vs_text_lm", 0.96, False),
        ("bf16_load_peak_rss_vs_bf16_weights", 1.2, True),
        ("bf16_load_peak_rss_vs_bf16_weights", 1.4, False),
        ("frozen_weight_gradient_bytes", 0, True),
        ("frozen_weight_gradient_bytes", 4, False),
        ("training_step_speedup_vs_plain", None, False),
    ],
)
def test_check_target_compares_the_value_with_the_goal(name, value, passed):
    target = check_target(name, value)
    assert target == {"value": value, "goal": f"{TARGET_GOALS[name][0]} {TARGET_GOALS[name][1]}", "pass": passed}


# --------------------------------------------------------------------------------------------------------------------
# The command line, end to end on the tiny size.


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmark")
    json_path = folder / "tiny.json"
    argv = ["--size", "tiny", "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--batch-sizes", "1", "8"]
    benchmark_main([*argv, "--no-compile", "--threads", "2", "--json", str(json_path)])
    return json_path


def test_benchmark_json_has_every_target_as_value_goal_and_pass(tiny_benchmark):
    results = json.loads(tiny_benchmark.read_text())
    assert set(results["targets"]) == set(TARGET_GOALS)
    for name, target in results["targets"].items():
        assert set(target) == {"value", "goal", "pass"}
        assert target == check_target(name, target["value"])


def test_benchmark_json_holds_every_case_with_medians_spread_and_peak_memory(tiny_benchmark):
    cases = json.loads(tiny_benchmark.read_text())["cases"]
    assert set(cases) == {"image_encoding", "decode", "batched_generation", "training_step", "loading"}
    for case in ("image_encoding", "training_step"):
        for row in cases[case]["variants"].values():
            assert set(row["seconds"]) == {"median", "p25", "p75", "min", "n"} and "peak_memory_bytes" in row
    assert [row["batch_size"] for row in cases["batched_generation"]["rows"]] == [1, 8]
    assert {row["new_tokens"] for row in cases["batched_generation"]["rows"]} == {3}
    assert cases["training_step"]["gradient_bytes"]["fast"]["frozen"] == 0
    for loaded in cases["loading"].values():
        assert loaded["dtypes"] == ["bfloat16"] and loaded["weight_bytes"] > 0


def test_benchmark_writes_the_batch_size_plot_as_png(tiny_benchmark):
    assert tiny_benchmark.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table_has_a_pass_or_fail_row_per_target(tiny_benchmark):
    lines = results_table(json.loads(tiny_benchmark.read_text())).splitlines()
    for name in TARGET_GOALS:
        rows = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(rows) == 1 and rows[0].endswith(("| PASS |", "| FAIL |"))


def test_benchmark_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="no CUDA GPU"):
        benchmark_main(["--device", "cuda"])


def test_benchmark_refuses_zero_repeats(capsys):
    with pytest.raises(SystemExit):
        benchmark_main(["--repeats", "0"])
    assert "must be at least 1" in capsys.readouterr().err
