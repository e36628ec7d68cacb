# LoRA for ADE20K on Stable Diffusion 2.1-base (configs/gate_upernet_ade20k_sd21.py).
_base_ = ['./ade20k.py']
model = 'stabilityai/stable-diffusion-2-1-base'
work_dir = 'work_dirs/lora/ade20k_sd21'
