# Transformer LoRA of Stable Diffusion 3.5 medium for ADE20K (configs/gate_upernet_ade20k_sd35.py);
# keep e.g. lora_step1500 (moderate) and lora_step3000 (slightly overfit).
_base_ = ['./_base_dit_.py']
model = 'stabilityai/stable-diffusion-3.5-medium'
image_dir = 'data/ade/ADEChallengeData2016/images/training'
work_dir = 'work_dirs/lora/ade20k_sd35'
