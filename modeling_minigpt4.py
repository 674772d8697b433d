"""MiniGPT-4 as a transformers model (Zhu et al., 2023, arXiv:2304.10592).

Data path: pixels -> `vision_model` (EVA ViT-g/14 + `ln_vision`) -> bridge -> `language_projection` (`llama_proj` in
`minigpt4/models/mini_gpt4.py@22d8888`) -> image features, which replace the image placeholder tokens of the prompt ->
`language_model` (Vicuna / LLaMA, without its head) -> `lm_head`. The bridge is the `qformer` (learned `query_tokens`
cross-attending to the image; MiniGPT-4 with Vicuna) or, with `config.use_qformer=False`, the token merge of MiniGPT-4
with Llama-2 and MiniGPT-v2: class token dropped, every `vision_token_merge` consecutive patch tokens concatenated
(`minigpt4/models/minigpt_v2.py@d94738a`, `encode_img`).

The layout is transformers' VLM layout (as `LlavaForConditionalGeneration`): [`MiniGPT4Model`] holds everything but
the output head and returns hidden states; [`MiniGPT4ForConditionalGeneration`] is `model` + `lm_head`. Inside `model`
the names follow transformers' BLIP-2 (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`), so
BLIP-2 weights load one to one. Folders saved in the earlier layout (`language_model.model.*`,
`language_model.lm_head.*`, `vision_model.*` at the top) load through `_checkpoint_conversion_mapping`.
"""

import inspect
from dataclasses import dataclass


# First: importing the configuration checks the transformers release (one clear error when it is too old).
try:
    from .configuration_minigpt4 import (
        CACHE_ARGUMENT,
        IGNORE_INDEX,
        MiniGPT4Config,
        images_only_at_prefill,
        init,
        renames_past_key_values,
    )
except ImportError:
    if __package__:  # Hub remote code (a package in transformers_modules): the relative import is the real one
        raise
    # Installed as top-level modules (pip install .)
    from configuration_minigpt4 import (
        CACHE_ARGUMENT,
        IGNORE_INDEX,
        MiniGPT4Config,
        images_only_at_prefill,
        init,
        renames_past_key_values,
    )

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    Blip2QFormerModel,
    Blip2VisionModel,
    Cache,
    GenerationMixin,
    PreTrainedModel,
    StoppingCriteria,
)
from transformers.modeling_outputs import (  # noqa: E402
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings  # noqa: E402
from transformers.utils.generic import can_return_tuple  # noqa: E402


@dataclass
class MiniGPT4ImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`MiniGPT4Model.get_image_features`].

    last_hidden_state (`torch.FloatTensor` of shape `(num_images, num_patches + 1, vision_hidden_size)`):
        ViT output after `ln_vision` (what the bridge reads).
    pooler_output (`torch.FloatTensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
        Projected image features, the soft tokens that replace the image placeholders.
    qformer_last_hidden_state (`torch.FloatTensor` of shape `(num_images, num_query_tokens, qformer_hidden_size)`):
        Q-Former output before the projection (`config.use_qformer=True`).
    merged_patch_embeds (`torch.FloatTensor` of shape `(num_images, num_image_tokens, merge * vision_hidden_size)`):
        Concatenated patch tokens before the projection (`config.use_qformer=False`).
    """

    qformer_last_hidden_state: torch.FloatTensor | None = None
    merged_patch_embeds: torch.FloatTensor | None = None


@dataclass
class MiniGPT4ModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`):
        The language model's last hidden states (before the output head).
    cache (`Cache`, returned when `use_cache=True`):
        The language model's key/value cache (`past_key_values` before transformers 5.24, the name it also answers
        to from 5.24).
    hidden_states, attentions:
        The language model's, when requested.
    image_features (`torch.FloatTensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
        The projected image features spliced into the prompt, when images were given.
    """

    image_features: torch.FloatTensor | None = None


@dataclass
class MiniGPT4CausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`, returned when `labels` is given):
        Next-token cross-entropy over the positions whose label is not -100.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Language-model scores.
    cache (`Cache`, returned when `use_cache=True`):
        The language model's key/value cache (`past_key_values` before transformers 5.24, the name it also answers
        to from 5.24).
    hidden_states, attentions:
        The language model's, when requested.
    image_features (`torch.FloatTensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
        The projected image features spliced into the prompt, when images were given.
    """

    image_features: torch.FloatTensor | None = None


class StopOnTokenSequences(StoppingCriteria):
    """Marks a row finished once it ends with any of the given token-id sequences (per row, vectorised)."""

    def __init__(self, stop_token_ids: list[list[int]]):
        self.stop_token_ids = [list(ids) for ids in stop_token_ids]
        self._stop_tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stop_matrix(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The sequences right-aligned in one matrix, built once per device.

        Returns:
            `(stops, wildcard)`, both of shape `(num_sequences, longest_sequence)`: the ids (-1 where a shorter
            sequence has no token) and `True` where a position matches anything.
        """
        if device not in self._stop_tensors:
            longest = max(len(ids) for ids in self.stop_token_ids)
            stops = torch.full((len(self.stop_token_ids), longest), -1, dtype=torch.long)
            for row, ids in enumerate(self.stop_token_ids):
                stops[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            wildcard = torch.arange(longest) < longest - torch.tensor([[len(ids)] for ids in self.stop_token_ids])
            self._stop_tensors[device] = (stops.to(device), wildcard.to(device))
        return self._stop_tensors[device]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        # One comparison for all sequences: it runs at every generated token, so it stays a few tensor ops.
        stops, wildcard = self._stop_matrix(input_ids.device)
        tail = input_ids[:, -stops.shape[1] :]  # (batch_size, longest)
        if tail.shape[1] < stops.shape[1]:
            tail = nn.functional.pad(tail, (stops.shape[1] - tail.shape[1], 0), value=-1)
        return ((tail.unsqueeze(1) == stops) | wildcard).all(dim=-1).any(dim=-1)


class MiniGPT4PreTrainedModel(PreTrainedModel):
    config_class = MiniGPT4Config
    config: MiniGPT4Config
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _supports_flash_attn = False  # the Q-Former has no flash-attention path
    _can_compile_fullgraph = False
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerLayer", "Blip2VisionEmbeddings"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    # Folders saved before the `model` / `lm_head` split (the BLIP-2 layout: the causal LM with its head under
    # `language_model`, the other parts at the top). `from_pretrained` renames their keys with this mapping
    # (transformers' `key_mapping`); keys of the current layout match none of the patterns. `save_pretrained` always
    # writes the current layout.
    _checkpoint_conversion_mapping = {
        r"^language_model\.model\.": "model.language_model.",
        r"^language_model\.lm_head\.": "lm_head.",
        r"^vision_model\.": "model.vision_model.",
        r"^qformer\.": "model.qformer.",
        r"^query_tokens": "model.query_tokens",
        r"^language_projection\.": "model.language_projection.",
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MiniGPT4Model) and module.query_tokens is not None:
            init.normal_(module.query_tokens, mean=0.0, std=std)
        elif isinstance(module, Blip2VisionEmbeddings):
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("key_mapping", cls._checkpoint_conversion_mapping)
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading re-creates the parameters (all trainable); restore the configured freezing.
        (loaded[0] if isinstance(loaded, tuple) else loaded).apply_freezing()  # a tuple with `output_loading_info`
        return loaded

    def save_pretrained(self, *args, **kwargs):
        # transformers would write a model loaded through `key_mapping` back in the layout it came from; the current
        # layout is what Trainer checkpoints are resumed into (`load_state_dict`), so it is always the one written.
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(*args, **kwargs)

    def train(self, mode: bool = True):
        """`nn.Module.train`, with the modules whose weights are all frozen kept in eval mode (see the config)."""
        super().train(mode)
        if mode and self.config.frozen_modules_in_eval_mode:
            _eval_where_frozen(self)
        return self


class MiniGPT4Model(MiniGPT4PreTrainedModel):
    """
    MiniGPT-4 without the output head: BLIP-2's ViT, a bridge (the Q-Former, or the merge of 4 consecutive patch
    tokens of MiniGPT-4 with Llama-2 and MiniGPT-v2), the trained projection, and the language model's decoder.
    Returns the decoder's hidden states.
    """

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        # `ln_vision` of the original (`minigpt4/models/blip2.py@22d8888`) is the ViT's post-layernorm; its eps
        # differs from the ViT blocks' (see `vision_layernorm_eps`).
        self.vision_model.post_layernorm.eps = config.vision_layernorm_eps
        if config.use_qformer:
            self.query_tokens = nn.Parameter(
                torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
            )
            self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
            projection_in_features = config.qformer_config.hidden_size
        else:  # the token-merge bridge has no weights
            self.query_tokens = None
            self.qformer = None
            projection_in_features = config.vision_token_merge * config.vision_config.hidden_size
        # `llama_proj` in `minigpt4/models/mini_gpt4.py@22d8888`.
        self.language_projection = nn.Linear(projection_in_features, config.text_config.hidden_size)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self.apply_freezing()

    def apply_freezing(
        self,
        freeze_vision_model: bool | None = None,
        freeze_qformer: bool | None = None,
        freeze_language_model: bool | None = None,
    ) -> None:
        """
        Sets `requires_grad` of each part: by default from the config, where only `language_projection` trains (as in
        `minigpt4/models/mini_gpt4.py@22d8888`). An argument overrides the config for this call only (the config
        itself is left as it is).
        """
        config = self.config
        freeze_vision_model = config.freeze_vision_model if freeze_vision_model is None else freeze_vision_model
        freeze_qformer = config.freeze_qformer if freeze_qformer is None else freeze_qformer
        freeze_language_model = config.freeze_language_model if freeze_language_model is None else freeze_language_model
        self.vision_model.requires_grad_(not freeze_vision_model)
        if self.qformer is not None:
            self.qformer.requires_grad_(not freeze_qformer)
            self.query_tokens.requires_grad_(not freeze_qformer)
        self.language_model.requires_grad_(not freeze_language_model)
        self.language_projection.requires_grad_(True)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    # ----------------------------------------------------------------------------------------------------------------
    # The data path.

    # Frozen vision model and Q-Former run without autograd while training; `False` runs them under the caller's grad
    # mode (the plain way, for measuring what this saves: minigpt4_hf/benchmark.py).
    frozen_encoders_without_grad: bool = True

    def get_image_features(
        self, pixel_values: torch.FloatTensor, return_dict: bool = False, **kwargs
    ) -> torch.FloatTensor | MiniGPT4ImageFeaturesOutput:
        """
        Encodes images into the language model's input space: ViT -> `ln_vision` -> bridge -> projection.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, image_size, image_size)`):
                Normalised images (any float dtype; they are cast to the vision model's dtype).
            return_dict (`bool`, defaults to `False`):
                Return a [`MiniGPT4ImageFeaturesOutput`] (with the intermediate outputs) instead of the tensor.

        Returns:
            `torch.FloatTensor` of shape `(num_images, num_image_tokens, text_hidden_size)`: the projected features.
        """
        # The frozen parts before the projection need no autograd graph (unless a caller wants pixel gradients).
        track_vision = (
            not self.frozen_encoders_without_grad or _requires_grad(self.vision_model) or pixel_values.requires_grad
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and track_vision):
            image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        if self.config.use_qformer:
            track_qformer = track_vision or _requires_grad(self.qformer) or self.query_tokens.requires_grad
            with torch.set_grad_enabled(torch.is_grad_enabled() and track_qformer):
                bridged = self.query_image_embeds(image_embeds)
        else:
            bridged = self.merge_patch_embeds(image_embeds)
        image_features = self.language_projection(bridged.to(self.language_projection.weight.dtype))

        if not return_dict:
            return image_features
        return MiniGPT4ImageFeaturesOutput(
            last_hidden_state=image_embeds,
            pooler_output=image_features,
            qformer_last_hidden_state=bridged if self.config.use_qformer else None,
            merged_patch_embeds=None if self.config.use_qformer else bridged,
        )

    def query_image_embeds(self, image_embeds: torch.FloatTensor) -> torch.FloatTensor:
        """
        The Q-Former bridge: the learned queries cross-attend to every ViT token.

        `(num_images, num_patches + 1, vision_hidden_size) -> (num_images, num_query_tokens, qformer_hidden_size)`.
        """
        image_attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention_mask,
            return_dict=True,
        ).last_hidden_state

    def merge_patch_embeds(self, image_embeds: torch.FloatTensor) -> torch.FloatTensor:
        """
        The bridge without Q-Former: drops the class token and concatenates every `vision_token_merge` consecutive
        patch tokens along the features (raster order, so a 1 x N horizontal strip; a reshape, not a 2-D pooling).

        `(num_images, num_patches + 1, vision_hidden_size)` ->
        `(num_images, num_image_tokens, vision_token_merge * vision_hidden_size)`.
        """
        patch_embeds = image_embeds[:, 1:, :]
        num_images, _, width = patch_embeds.shape
        return patch_embeds.reshape(num_images, -1, self.config.vision_token_merge * width)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.FloatTensor, image_features: torch.FloatTensor
    ) -> torch.BoolTensor:
        """
        Finds the image placeholder positions and checks that they fit the images.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`)
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`)
            image_features (`torch.FloatTensor` of shape `(num_images, num_image_tokens, text_hidden_size)`)

        Returns:
            `torch.BoolTensor` of shape `(batch_size, sequence_length, 1)`, broadcastable to `inputs_embeds`.
        """
        image_mask = input_ids == self.config.image_token_id
        num_image_tokens = int(image_mask.sum())
        num_images, tokens_per_image = image_features.shape[:2]
        if num_image_tokens != num_images * tokens_per_image:
            raise ValueError(
                f"The input has {num_image_tokens} image tokens (id {self.config.image_token_id}), i.e. "
                f"{num_image_tokens / tokens_per_image:g} image(s) of {tokens_per_image} tokens, but {num_images} "
                "image(s) were given. Build the inputs with MiniGPT4Processor, one <ImageHere> per image."
            )
        return image_mask.unsqueeze(-1).to(inputs_embeds.device)

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        """
        Embeds `input_ids` (batch_size, sequence_length) -> (batch_size, sequence_length, text_hidden_size).

        Image placeholders lie outside the vocabulary: they look up row 0, which the image features then overwrite.
        Single-token decode steps never hold a placeholder and skip that work.
        """
        if input_ids.shape[1] > 1 and self.config.image_token_id >= self.get_input_embeddings().num_embeddings:
            input_ids = input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
        return self.get_input_embeddings()(input_ids)

    @can_return_tuple
    @renames_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> MiniGPT4ModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt ids in which each image is a run of `config.num_image_tokens` ids equal to
                `config.image_token_id`
                (as [`MiniGPT4Processor`] builds them).
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, image_size, image_size)`, *optional*):
                The images, in the order their placeholders appear (row by row, left to right).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            mm_encoder_outputs (`dict`, *optional*):
                `{"image": get_image_features(..., return_dict=True)}`, pre-computed (used by `generate`).
            kwargs:
                Passed on to the language model, down to its attention functions.

        Returns:
            [`MiniGPT4ModelOutputWithPast`].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("Pass either `pixel_values` or `mm_encoder_outputs`, not both.")

        image_features = None
        if mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
        elif pixel_values is not None:
            image_features = self.get_image_features(pixel_values)

        sequence_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if sequence_length > 1:
            self._check_context_length(sequence_length, cache)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if image_features is not None:
                image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
                image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
                inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
            elif sequence_length > 1 and bool((input_ids == self.config.image_token_id).any()):
                num_image_tokens = int((input_ids == self.config.image_token_id).sum())
                raise ValueError(
                    f"The input has {num_image_tokens} image tokens but 0 images were given: pass `pixel_values`."
                )
        elif image_features is not None:
            raise ValueError("Images can only be spliced into `input_ids`; with `inputs_embeds`, splice them yourself.")

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE_ARGUMENT: cache},
            **kwargs,
        )
        return MiniGPT4ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
            **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
        )

    def _check_context_length(self, sequence_length: int, cache: Cache | None) -> None:
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        past_length = cache.get_seq_length() if cache is not None else 0
        if max_positions is not None and past_length + sequence_length > max_positions:
            raise ValueError(
                f"The input is {past_length + sequence_length} tokens long (image tokens included), more than the "
                f"language model's context of {max_positions} tokens. Shorten the prompt or use fewer images."
            )


@images_only_at_prefill
class MiniGPT4ForConditionalGeneration(MiniGPT4PreTrainedModel, GenerationMixin):
    """MiniGPT-4: BLIP-2's frozen ViT and Q-Former, a trained linear projection and a frozen causal language model."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self.model = MiniGPT4Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self.apply_freezing()
        # Trainers may replace `forward` (TRL puts a fused LM head there); labels are cleaned before any of them runs.
        self.register_forward_pre_hook(_ignore_image_tokens_in_labels, with_kwargs=True)

    # ----------------------------------------------------------------------------------------------------------------
    # The parts, as on `self.model` (the names of the BLIP-2 layout, kept for the users of the generating class).

    @property
    def vision_model(self) -> Blip2VisionModel:
        return self.model.vision_model

    @property
    def query_tokens(self) -> nn.Parameter | None:
        return self.model.query_tokens

    @property
    def qformer(self) -> Blip2QFormerModel | None:
        return self.model.qformer

    @property
    def language_projection(self) -> nn.Linear:
        return self.model.language_projection

    @property
    def language_model(self) -> nn.Module:
        """The language model's decoder, without the output head (`lm_head`)."""
        return self.model.language_model

    def apply_freezing(
        self,
        freeze_vision_model: bool | None = None,
        freeze_qformer: bool | None = None,
        freeze_language_model: bool | None = None,
    ) -> None:
        """[`MiniGPT4Model.apply_freezing`]; the output head follows the language model."""
        self.model.apply_freezing(freeze_vision_model, freeze_qformer, freeze_language_model)
        freeze_language_model = (
            self.config.freeze_language_model if freeze_language_model is None else freeze_language_model
        )
        self.lm_head.requires_grad_(not freeze_language_model)

    # ----------------------------------------------------------------------------------------------------------------
    # Embedding accessors (resize_token_embeddings, PEFT, input-grad hooks go through these).

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    # ----------------------------------------------------------------------------------------------------------------
    # The data path (in `self.model`), then the head.

    def get_image_features(
        self, pixel_values: torch.FloatTensor, return_dict: bool = False, **kwargs
    ) -> torch.FloatTensor | MiniGPT4ImageFeaturesOutput:
        """[`MiniGPT4Model.get_image_features`]."""
        return self.model.get_image_features(pixel_values, return_dict=return_dict, **kwargs)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.FloatTensor, image_features: torch.FloatTensor
    ) -> torch.BoolTensor:
        """[`MiniGPT4Model.get_placeholder_mask`]."""
        return self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features)

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        """[`MiniGPT4Model.embed_tokens`]."""
        return self.model.embed_tokens(input_ids)

    @can_return_tuple
    @renames_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> MiniGPT4CausalLMOutputWithPast:
        r"""
        Args:
            input_ids, pixel_values, attention_mask, mm_encoder_outputs:
                As [`MiniGPT4Model.forward`].
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Unshifted targets, -100 where no loss is taken (prompt, padding). Image positions never count: a
                label equal to `config.image_token_id` (collators that copy `input_ids`, as TRL's) is set to -100
                before the model runs.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Scores only the last `logits_to_keep` positions (0: all), or the positions given as a tensor.

        Returns:
            [`MiniGPT4CausalLMOutputWithPast`].
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, kept, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return MiniGPT4CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=outputs.image_features,
            **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
        )

    # Registered for the Auto classes, this model counts as remote code, for which `generate` re-reads the forward
    # signature at every token (`prepare_inputs_for_generation`); computing it once keeps that off the token loop.
    forward.__signature__ = inspect.signature(forward)

    # ----------------------------------------------------------------------------------------------------------------
    # Generation: the stock GenerationMixin.generate, plus per-row stopping at the end of the assistant turn.

    def _get_stopping_criteria(self, *args, **kwargs):
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        if self.config.stop_token_ids and not any(isinstance(c, StopOnTokenSequences) for c in criteria):
            criteria.append(StopOnTokenSequences(self.config.stop_token_ids))
        return criteria


def _ignore_image_tokens_in_labels(model: MiniGPT4ForConditionalGeneration, args: tuple, kwargs: dict):
    """Forward pre-hook: image placeholders in `labels` become -100 (the id lies outside the vocabulary)."""
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = labels.masked_fill(labels == model.config.image_token_id, IGNORE_INDEX)
    return args, kwargs


def _eval_where_frozen(module: nn.Module) -> None:
    """Puts every submodule of `module` whose parameters are all frozen in eval mode; others keep their mode."""
    for child in module.children():
        parameters = list(child.parameters())
        if not any(parameter.requires_grad for parameter in parameters):
            if parameters:
                child.eval()
        else:
            _eval_where_frozen(child)


def _requires_grad(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


__all__ = [
    "MiniGPT4ForConditionalGeneration",
    "MiniGPT4Model",
    "MiniGPT4ModelOutputWithPast",
    "MiniGPT4PreTrainedModel",
    "MiniGPT4CausalLMOutputWithPast",
    "MiniGPT4ImageFeaturesOutput",
    "StopOnTokenSequences",
]

MiniGPT4ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
