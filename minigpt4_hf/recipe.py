"""
The original MiniGPT-4 two-stage training recipe as plain values (Vision-CAIR/MiniGPT-4 @22d8888:
`train_configs/minigpt4_stage{1_pretrain,2_finetune}.yaml`, `prompts/alignment.txt`,
`minigpt4/processors/blip_processors.py`). No heavy imports: minigpt4-train shows these values in its `--help`.
"""

from typing import Any


# `prompt_template` of train_configs/minigpt4_stage2_finetune.yaml.
STAGE2_PROMPT_TEMPLATE = "###Human: {} ###Assistant: "
# prompts/alignment.txt of the original, in file order.
ALIGNMENT_PROMPTS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)
# `BlipCaptionProcessor(max_words=50)`.
CAPTION_MAX_WORDS = 50

# What `--stage 1` / `--stage 2` set; every value can be overridden on the command line. Keys are the flag names of
# minigpt4-train (TrainingArguments fields and the tool's own data/model fields), with underscores.
STAGE_PRESETS: dict[int, dict[str, Any]] = {
    # train_configs/minigpt4_stage1_pretrain.yaml: LAION + CC/SBU, 4 "epochs" x 5000 iterations, batch 64 per GPU.
    1: {
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
    },
    # train_configs/minigpt4_stage2_finetune.yaml: cc_sbu_align, 5 "epochs" x 200 iterations, batch 12, 1 GPU.
    2: {
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
    },
}

IMAGE_TRANSFORMS = ("random_resized_crop", "resize")
