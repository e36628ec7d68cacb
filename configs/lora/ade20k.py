# LoRA for ADE20K; keep e.g. lora_step1500 (moderate) and lora_step3000 (slightly overfit).
_base_ = ['./_base_.py']
image_dir = 'data/ade/ADEChallengeData2016/images/training'
work_dir = 'work_dirs/lora/ade20k'
