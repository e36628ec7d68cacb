# Transformer LoRA of FLUX.1-dev for ADE20K (configs/gate_upernet_ade20k_flux*.py); keep e.g.
# lora_step1500 (moderate) and lora_step3000 (slightly overfit). Train in bfloat16
# (--mixed-precision auto on a GPU) with --gradient-checkpointing: 12B frozen parameters.
_base_ = ['./_base_dit_.py']
model = 'black-forest-labs/FLUX.1-dev'
image_dir = 'data/ade/ADEChallengeData2016/images/training'
work_dir = 'work_dirs/lora/ade20k_flux'
