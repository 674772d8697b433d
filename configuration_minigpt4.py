"""MiniGPT-4 configuration.

MiniGPT-4 (Zhu et al., 2023, arXiv:2304.10592) = frozen EVA-CLIP ViT-g/14 -> `ln_vision` -> frozen BLIP-2 Q-Former
(32 learned queries) -> one trained Linear (`llama_proj` in `minigpt4/models/mini_gpt4.py@22d8888`) -> 32 soft tokens
spliced into a frozen Vicuna prompt.

The later releases of the same repository change only the bridge between the ViT and the projection: MiniGPT-4 with
Llama-2-7B-chat and MiniGPT-v2 (Chen et al., 2023) have no Q-Former; they drop the class token and concatenate every 4
consecutive patch tokens (`minigpt4/models/minigpt_v2.py@d94738a`, `encode_img`), giving 64 image tokens at 224 px and
256 at 448 px. `use_qformer=False` selects that bridge; `variant` names the released family.

The vision and Q-Former parts reuse transformers' BLIP-2 configurations (`Blip2VisionConfig`, `Blip2QFormerConfig`),
so that BLIP-2 weights map onto them one to one. The defaults describe MiniGPT-4 with Vicuna-7B v0.

This file also holds the one section where the supported transformers releases differ ("transformers compatibility"
below); modeling_minigpt4.py and processing_minigpt4.py import what they need from it.
"""

import copy
import functools
import inspect

import transformers
from packaging import version


# =====================================================================================================================
# transformers compatibility: the ONE place where the supported releases differ.
#
# The three remote-code files run unchanged on every transformers release from MINIMUM_TRANSFORMERS_VERSION to the
# newest (docs/transformers-versions.md). What changed between those releases is decided here,
# once, from the installed release, always taking the newest API that release has; the rest of the three files uses
# only the names defined here and APIs that every supported release shares.
#
#   since  what changed                                                      handled by
#   5.0    `PretrainedConfig` is spelled `PreTrainedConfig`;                 PreTrainedConfig, init
#          `transformers.initialization` (init functions that leave loaded weights alone)
#   5.0    ProcessorMixin reads the sub-processors from `__init__`'s          declare_sub_processors
#          signature (before: `attributes` + `<name>_class` class attributes)
#   5.4    configs are dataclasses (typed fields, `__post_init__`)           CompositeConfig, strict_config
#   5.4    BLIP's PIL image processor is `BlipImageProcessorPil`             BlipImageProcessorPil
#   5.15   `generate` passes `pixel_values` to the prefill only              images_only_at_prefill
#   5.20   sub-configs are declared as `SubConfigSpec`s                      sub_config_spec, CompositeConfig
#   5.24   `cache` replaces `past_key_values` (model arguments, outputs)     CACHE_ARGUMENT, renames_past_key_values
# =====================================================================================================================

MINIMUM_TRANSFORMERS_VERSION = "4.57.0"


def check_transformers_version(found: str, minimum: str = MINIMUM_TRANSFORMERS_VERSION) -> None:
    """Raises a one-line `ImportError` naming the fix when the transformers release `found` is older than `minimum`."""
    if version.parse(version.parse(found).base_version) < version.parse(minimum):
        raise ImportError(
            f"MiniGPT-4's remote code needs transformers >= {minimum} (found {found}): "
            f'pip install -U "transformers>={minimum}"'
        )


# Checked before anything else is imported from transformers: an older release fails here, in one line, instead of
# somewhere deep inside an import.
check_transformers_version(transformers.__version__)

from transformers import AutoConfig  # noqa: E402
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig  # noqa: E402

# A development build ("5.25.0.dev0") counts as the release it leads to.
TRANSFORMERS_VERSION = version.parse(version.parse(transformers.__version__).base_version)


def transformers_since(release: str) -> bool:
    """Whether the installed transformers is `release` or newer."""
    return TRANSFORMERS_VERSION >= version.parse(release)


DATACLASS_CONFIGS = transformers_since("5.4")
SUB_CONFIG_SPECS = transformers_since("5.20")
# The keyword under which models take and return their key/value cache.
CACHE_ARGUMENT = "cache" if transformers_since("5.24") else "past_key_values"

if transformers_since("5.0"):
    from transformers import PreTrainedConfig
    from transformers import initialization as init
else:
    from torch.nn import init
    from transformers import PretrainedConfig as PreTrainedConfig

if transformers_since("5.4"):
    from huggingface_hub.dataclasses import strict as strict_config
    from transformers import BlipImageProcessorPil
else:
    from transformers import BlipImageProcessor as BlipImageProcessorPil  # the PIL/NumPy one (torchvision: ...Fast)

    def strict_config(cls):
        """Type validation of config fields needs dataclass configs (5.4); older releases keep the class as it is."""
        return cls


if SUB_CONFIG_SPECS:
    from transformers.configuration_utils import SubConfigSpec


def sub_config_spec(config_class, model_type: str | None = None):
    """
    One entry of `sub_configs_defaults`: the sub-config's class (or `AutoConfig` with a default `model_type`).
    A `SubConfigSpec` from 5.20; before, the pair `(config_class, model_type)` that `CompositeConfig` reads.
    """
    if SUB_CONFIG_SPECS:
        return SubConfigSpec(config_class=config_class, model_type=model_type)
    return (config_class, model_type)


if SUB_CONFIG_SPECS:
    CompositeConfig = PreTrainedConfig
else:

    class CompositeConfig(PreTrainedConfig):
        """
        What `PreTrainedConfig` does for a config with sub-configs from 5.20 on, for older releases: builds each
        sub-config of `sub_configs_defaults` from its dict (or its defaults) before the subclass's `__post_init__`
        continues, and lists their classes in `sub_configs`. Before 5.4 it also gives the subclass the keyword
        `__init__` of a dataclass config: fields from the annotated class attributes, the rest to `__post_init__`.
        """

        sub_configs_defaults = {}  # not a dataclass field: no annotation

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            cls.sub_configs = {name: config_class for name, (config_class, _) in cls.sub_configs_defaults.items()}

        if not DATACLASS_CONFIGS:

            def __init__(self, **kwargs):
                for name, default in self._field_defaults().items():
                    setattr(self, name, kwargs.pop(name) if name in kwargs else copy.deepcopy(default))
                self.__post_init__(**kwargs)

            @classmethod
            def _field_defaults(cls) -> dict:
                """The annotated class attributes of the subclasses (the dataclass fields from 5.4) and defaults."""
                subclasses = reversed(cls.__mro__[: cls.__mro__.index(CompositeConfig)])
                return {name: getattr(cls, name) for klass in subclasses for name in inspect.get_annotations(klass)}

        def __post_init__(self, **kwargs):
            for name, (config_class, model_type) in self.sub_configs_defaults.items():
                value = getattr(self, name)
                if not isinstance(value, PreTrainedConfig):
                    value = dict(value or {})
                    if config_class is AutoConfig:
                        value = AutoConfig.for_model(value.pop("model_type", model_type), **value)
                    else:
                        value = config_class(**value)
                    setattr(self, name, value)
            if DATACLASS_CONFIGS:
                super().__post_init__(**kwargs)
            else:
                # `PretrainedConfig.__init__` sets the attributes it takes (4.57: `tie_word_embeddings`, ...) from its
                # arguments: it gets the fields' values for those.
                parameters = inspect.signature(PreTrainedConfig.__init__).parameters
                own = {name: getattr(self, name) for name in self._field_defaults() if name in parameters}
                super().__init__(**own, **kwargs)


def renames_past_key_values(forward):
    """
    Lets a `forward` written with `cache=` also take `past_key_values=` (what `generate` passes before 5.24; from 5.24
    deprecated, with transformers' own warning).
    """
    if CACHE_ARGUMENT == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_taking_past_key_values(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(self, *args, **kwargs)

    return forward_taking_past_key_values


def images_only_at_prefill(model_class):
    """
    Before 5.15 `generate` passes `pixel_values` to every decoding step: the model class gets a
    `prepare_inputs_for_generation` that keeps them for the prefill only (the step that fills an empty cache), as
    `generate` does itself from 5.15 (and from 5.18 encodes them once, before the first step: `mm_encoder_outputs`).
    """
    if transformers_since("5.15"):
        return model_class

    def prepare_inputs_for_generation(self, *args, **kwargs):
        model_inputs = super(model_class, self).prepare_inputs_for_generation(*args, **kwargs)
        cache = model_inputs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            model_inputs.pop("pixel_values", None)
        return model_inputs

    model_class.prepare_inputs_for_generation = prepare_inputs_for_generation
    return model_class


def declare_sub_processors(**class_names: str):
    """
    Before 5.0, `ProcessorMixin` finds a processor's parts from its `attributes` and `<name>_class` class attributes
    (from 5.0: from `__init__`'s signature). Class decorator: `@declare_sub_processors(tokenizer="...", ...)`.
    """

    def declare(processor_class):
        if not transformers_since("5.0"):
            processor_class.attributes = list(class_names)
            for name, class_name in class_names.items():
                setattr(processor_class, f"{name}_class", class_name)
        return processor_class

    return declare


# =====================================================================================================================

# Label of the positions that take no loss (PyTorch's cross-entropy `ignore_index`).
IGNORE_INDEX = -100
# The prompt pieces of the original (`minigpt4/conversation/conversation.py@22d8888`), shared by the processor, the
# chat template and the training presets.
DEFAULT_IMAGE_TOKEN = "<ImageHere>"
# `CONV_VISION_Vicuna0.system` (`minigpt4/conversation/conversation.py@d94738a`).
DEFAULT_SYSTEM_PROMPT = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to you. "
    "Please answer my questions."
)
# LLaMA's tokenizer writes the turn separator "###" as `[835]` ("▁###") or `[2277, 29937]` ("##" + "#").
LLAMA_STOP_TOKEN_IDS = [[835], [2277, 29937]]
# The released families: MiniGPT-4 with Vicuna v0, MiniGPT-4 with Llama-2-7B-chat, MiniGPT-v2.
VARIANTS = ("vicuna0", "llama2", "v2")
MINIGPT4_AUTO_MAP = {
    "AutoConfig": "configuration_minigpt4.MiniGPT4Config",
    "AutoModel": "modeling_minigpt4.MiniGPT4ForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_minigpt4.MiniGPT4ForConditionalGeneration",
}


@strict_config
class MiniGPT4Config(CompositeConfig):
    r"""
    Configuration of [`MiniGPT4ForConditionalGeneration`] and [`MiniGPT4Model`].

    Args:
        vision_config (`dict` or `Blip2VisionConfig`, *optional*):
            The EVA ViT-g/14 (defaults: 224 px, patch 14, 39 layers, width 1408, 16 heads, MLP 6144, eps 1e-6,
            q/v bias).
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            The BLIP-2 Q-Former (BERT-base, cross-attention every 2nd layer). Its `encoder_hidden_size` is always set
            to the vision width.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Any decoder-only language model config; LLaMA-7B by default.
        num_query_tokens (`int`, defaults to 32):
            Number of learned queries, i.e. soft tokens one image becomes in the language model's input.
        image_token_id (`int`, defaults to 32000):
            Id of the image placeholder token in `input_ids`. By default it lies just past the LLaMA vocabulary, so the
            language model's embedding table stays untouched (the id never reaches the embedding lookup).
        vision_layernorm_eps (`float`, defaults to 1e-5):
            Epsilon of the LayerNorm after the ViT (`ln_vision` in `minigpt4/models/blip2.py@22d8888`, PyTorch's 1e-5;
            transformers' BLIP-2 uses the ViT's 1e-6 there).
        use_qformer (`bool`, defaults to `True`):
            The bridge between the ViT and the projection. `True`: the Q-Former and its `num_query_tokens` learned
            queries (MiniGPT-4 with Vicuna). `False`: no Q-Former (and no Q-Former or query-token weights); the class
            token is dropped and every `vision_token_merge` consecutive patch tokens are concatenated (MiniGPT-4 with
            Llama-2, MiniGPT-v2).
        vision_token_merge (`int`, defaults to 4):
            With `use_qformer=False`: how many consecutive patch tokens (raster order, so a 1 x N horizontal strip)
            become one image token; the projection then takes `vision_token_merge * vision_config.hidden_size`
            features.
        variant (`str`, defaults to `"vicuna0"`):
            The released family this configuration describes: `"vicuna0"`, `"llama2"` or `"v2"`. It changes nothing
            in the model's computation; the chat template, the stop sequences and the generation defaults follow it.
        stop_token_ids (`list[list[int]]`, *optional*):
            Token-id sequences that end an assistant turn; generation stops each row on its own when it produces one.
            Defaults to the variant's: LLaMA's two spellings of `###` (`[[835], [2277, 29937]]`) for `"vicuna0"`, the
            language model's EOS for `"v2"`, and both for `"llama2"` (its original demo passes the `###` ids).
        freeze_vision_model (`bool`, defaults to `True`):
            No gradients for the ViT (and `ln_vision`), as in `minigpt4/models/mini_gpt4.py@22d8888`.
        freeze_qformer (`bool`, defaults to `True`):
            No gradients for the Q-Former and its query tokens.
        freeze_language_model (`bool`, defaults to `True`):
            No gradients for the language model and its output head. Adapters added on top (LoRA) still train: PEFT
            gives them their own trainable parameters.
        frozen_modules_in_eval_mode (`bool`, defaults to `True`):
            While training, every submodule whose parameters are all frozen runs in eval mode (dropout off), as the
            original's `disabled_train` kept the frozen ViT, Q-Former and LLM (`minigpt4/models/mini_gpt4.py@22d8888`).
            What holds trainable parameters follows `train()`/`eval()` as usual: the projection, an unfrozen part,
            and LoRA layers inside a frozen language model, whose `lora_dropout` is then active while training (set
            it in the `LoraConfig`; 0 turns it off). `False`: every module follows `train()`/`eval()`, frozen or not.
        tie_word_embeddings (`bool`, defaults to `False`):
            Tie the output head to the language model's input embeddings (taken from `text_config` when it ties them;
            LLaMA and Vicuna do not).
        initializer_range (`float`, defaults to 0.02):
            Std of the normal initialisation of the query tokens and the projection.
    """

    model_type = "minigpt4"
    sub_configs_defaults = {
        "vision_config": sub_config_spec(Blip2VisionConfig),
        "qformer_config": sub_config_spec(Blip2QFormerConfig),
        "text_config": sub_config_spec(AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_id: int = 32000
    vision_layernorm_eps: float = 1e-5
    use_qformer: bool = True
    vision_token_merge: int = 4
    variant: str = "vicuna0"
    stop_token_ids: list | None = None
    freeze_vision_model: bool = True
    freeze_qformer: bool = True
    freeze_language_model: bool = True
    frozen_modules_in_eval_mode: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The Q-Former cross-attends to the ViT output, whatever the Q-Former config said.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {', '.join(VARIANTS)}; got {self.variant!r}.")
        if not self.use_qformer:
            self._check_token_merge()
        # The output head lives next to the language model, so its tying is decided here (as transformers' VLMs do).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.stop_token_ids is None:
            self.stop_token_ids = self._default_stop_token_ids()
        self.stop_token_ids = [[int(i) for i in ids] for ids in self.stop_token_ids]
        if any(len(ids) == 0 for ids in self.stop_token_ids):
            raise ValueError(f"`stop_token_ids` must hold non-empty id lists, got {self.stop_token_ids}.")
        # Saved folders load with the Auto classes as remote code (`trust_remote_code=True`).
        auto_map = dict(getattr(self, "auto_map", None) or {})
        for auto_class, target in MINIGPT4_AUTO_MAP.items():
            auto_map.setdefault(auto_class, target)
        self.auto_map = auto_map

    @property
    def num_image_tokens(self) -> int:
        """Soft tokens one image becomes: the queries with the Q-Former, else the merged patch tokens."""
        if self.use_qformer:
            return self.num_query_tokens
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return grid * grid // self.vision_token_merge

    def _check_token_merge(self) -> None:
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if self.vision_token_merge < 1 or (grid * grid) % self.vision_token_merge:
            raise ValueError(
                f"`vision_token_merge` must divide the {grid * grid} patch tokens of a "
                f"{self.vision_config.image_size} px image ({self.vision_config.patch_size} px patches); got "
                f"{self.vision_token_merge}."
            )

    def _default_stop_token_ids(self) -> list[list[int]]:
        eos = [[self.text_config.eos_token_id]] if self.text_config.eos_token_id is not None else []
        if self.variant == "v2":
            return eos
        hashes = [list(ids) for ids in LLAMA_STOP_TOKEN_IDS]
        return eos + hashes if self.variant == "llama2" else hashes


__all__ = [
    "MiniGPT4Config", "DEFAULT_IMAGE_TOKEN", "DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "LLAMA_STOP_TOKEN_IDS", "VARIANTS"
]

MiniGPT4Config.register_for_auto_class()
