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
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig


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


@strict
class MiniGPT4Config(PreTrainedConfig):
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
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
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
