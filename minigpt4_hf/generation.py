"""
The original chat's generation settings, and the one function that turns generation settings into `generate()`
keyword arguments. Standard library only: the command-line tools read these before they parse their flags.
"""

from collections.abc import Mapping


# `Chat.answer` kept prompt + answer within 2,000 tokens (`max_length=2000`, minigpt4/conversation/conversation.py
# @22d8888).
ORIGINAL_CONTEXT_BUDGET = 2000
# `Chat.answer` defaults (minigpt4/conversation/conversation.py@22d8888): always sampling, nucleus 0.9, one beam.
CHAT_GENERATION_DEFAULTS = {
    "do_sample": True,
    "top_p": 0.9,
    "temperature": 1.0,
    "max_new_tokens": 300,
    "num_beams": 1,
    "repetition_penalty": 1.0,
}
# Settings that only shape sampling: greedy decoding and beam search ignore them (and transformers warns about them).
SAMPLING_ONLY_SETTINGS = ("temperature", "top_p")


def generation_kwargs(settings: Mapping) -> dict:
    """
    `generate()` keyword arguments from generation settings: a copy of `settings` without `temperature` and `top_p`
    when `do_sample` is false or missing (greedy / beam search).
    """
    kwargs = dict(settings)
    if not kwargs.get("do_sample", False):
        for name in SAMPLING_ONLY_SETTINGS:
            kwargs.pop(name, None)
    return kwargs
