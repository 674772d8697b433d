"""
The original training recipes as plain values: MiniGPT-4 with Vicuna v0 (Vision-CAIR/MiniGPT-4 @22d8888:
`train_configs/minigpt4_stage{1_pretrain,2_finetune}.yaml`, `prompts/alignment.txt`,
`minigpt4/processors/blip_processors.py`), MiniGPT-4 with Llama-2 (`train_configs/minigpt4_llama2_stage*.yaml`) and
MiniGPT-v2's fine-tuning (`train_configs/minigptv2_finetune.yaml` @d94738a). No heavy imports: minigpt4-train shows
these values in its `--help`.
"""

from typing import Any


# `prompt_template` of train_configs/minigpt4_stage2_finetune.yaml.
STAGE2_PROMPT_TEMPLATE = "###Human: {} ###Assistant: "
# `prompt_template` of train_configs/minigpt4_llama2_stage2_finetune.yaml (trailing space included).
LLAMA2_PROMPT_TEMPLATE = "[INST] {} [/INST] "
# `prompt_template` of train_configs/minigptv2_finetune.yaml (no trailing space: its instructions end with one).
V2_PROMPT_TEMPLATE = "[INST] {} [/INST]"
# prompts/alignment.txt of the original, in file order.
ALIGNMENT_PROMPTS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)
# How a record's own instruction is put with its image: the alignment prompts' form, and the form every MiniGPT-v2
# dataset used (`'<Img><ImageHere></Img> {} '`, e.g. minigpt4/datasets/datasets/coco_dataset.py@d94738a).
IMAGE_INSTRUCTION_FORMAT = "<Img><ImageHere></Img> {}"
V2_IMAGE_INSTRUCTION_FORMAT = "<Img><ImageHere></Img> {} "
# The text that starts each later question of a conversation (`bos_token + question` in the original's
# `tokenize_conversation`, minigpt4/models/minigpt_base.py@d94738a); the processor reads it as the BOS id.
BOS_TEXT = "<s>"
# `BlipCaptionProcessor(max_words=50)`.
CAPTION_MAX_WORDS = 50

# LoRA of the released MiniGPT-v2 (`minigpt4/models/minigpt_v2.py@d94738a`): the rank is in the tensors' shapes, the
# alpha is not; dropout only mattered in training.
RELEASED_LORA_ALPHA = 16
RELEASED_LORA_DROPOUT = 0.05

# The original MiniGPT-4 (Vicuna v0) runs; MiniGPT-4 with Llama-2 used the same schedule
# (train_configs/minigpt4_llama2_stage{1_pretrain,2_finetune}.yaml).
_STAGE1 = {
    # train_configs/minigpt4_stage1_pretrain.yaml: LAION + CC/SBU, 4 "epochs" x 5000 iterations, batch 64 per GPU.
    "learning_rate": 1e-4,  # init_lr
    "min_lr": 8e-5,
    "warmup_lr": 1e-6,
    "warmup_steps": 5000,
    "weight_decay": 0.05,
    "max_steps": 20000,
    "per_device_train_batch_size": 64,
    "max_grad_norm": 0.0,  # the original never clips gradients
    "seed": 42,
    "save_steps": 5000,  # the original saved a checkpoint per 5000-iteration "epoch"
    "logging_steps": 50,  # log_freq
    "max_txt_len": 32,
    "end_symbol": "\n",
    "prompt_template": "",  # no prompt: [BOS][image][caption + "\n"]
    "clean_captions": True,  # blip_caption text processor
}
_STAGE2 = {
    # train_configs/minigpt4_stage2_finetune.yaml: cc_sbu_align, 5 "epochs" x 200 iterations, batch 12, 1 GPU.
    "learning_rate": 3e-5,
    "min_lr": 1e-5,
    "warmup_lr": 1e-6,
    "warmup_steps": 200,
    "weight_decay": 0.05,
    "max_steps": 1000,
    "per_device_train_batch_size": 12,
    "max_grad_norm": 0.0,
    "seed": 42,
    "save_steps": 200,
    "logging_steps": 50,
    "max_txt_len": 160,
    "end_symbol": "###",
    "prompt_template": STAGE2_PROMPT_TEMPLATE,
    "clean_captions": False,  # CCSBUAlignDataset used the captions raw
}

# What `--variant V --stage N` sets; every value can be overridden on the command line. Keys are the flag names of
# minigpt4-train (TrainingArguments fields and the tool's own data/model fields), with underscores.
TRAINING_PRESETS: dict[str, dict[int, dict[str, Any]]] = {
    "vicuna0": {1: _STAGE1, 2: _STAGE2},
    "llama2": {
        # minigpt4_llama2_stage1_pretrain.yaml sets only the model type: the defaults of stage 1 apply (no prompt,
        # end "\n", max_txt_len 32).
        1: dict(_STAGE1),
        # minigpt4_llama2_stage2_finetune.yaml: the Llama-2 template and its end of sequence.
        2: {**_STAGE2, "end_symbol": "</s>", "prompt_template": LLAMA2_PROMPT_TEMPLATE},
    },
    "v2": {
        # minigptv2_finetune.yaml (the released stage-3 fine-tuning, from the stage-2 checkpoint): 50 "epochs" x
        # 1000 iterations, LoRA r 64 / alpha 16 on q_proj and v_proj (dropout 0.05, minigpt_v2.py's default),
        # 448 px squashed (boxes in the answers stay true), answers up to 1024 tokens ending in "</s>". The
        # original drew a dataset per iteration with its own batch size (2-6); here one batch size serves all.
        3: {
            "learning_rate": 1e-5,
            "min_lr": 1e-6,
            "warmup_lr": 1e-6,
            "warmup_steps": 1000,
            "weight_decay": 0.05,
            "max_steps": 50000,
            "per_device_train_batch_size": 6,
            "max_grad_norm": 0.0,
            "seed": 42,
            "save_steps": 1000,
            "logging_steps": 50,
            "max_txt_len": 1024,
            "end_symbol": "</s>",
            "prompt_template": V2_PROMPT_TEMPLATE,
            "instruction_format": V2_IMAGE_INSTRUCTION_FORMAT,
            "followup_format": "{} ",
            "clean_captions": False,
            "image_transform": "resize",
            "lora_r": 64,
            "lora_alpha": RELEASED_LORA_ALPHA,
            "lora_dropout": RELEASED_LORA_DROPOUT,
            "lora_target_modules": ["q_proj", "v_proj"],
        },
    },
}
# The Vicuna v0 presets by stage (the same dicts).
STAGE_PRESETS: dict[int, dict[str, Any]] = TRAINING_PRESETS["vicuna0"]

IMAGE_TRANSFORMS = ("random_resized_crop", "resize")
