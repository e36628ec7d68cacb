# LoRA for ADE20K on SDXL base 1.0 at 1024x1024 (configs/gate_upernet_ade20k_sdxl.py).
_base_ = ['./ade20k.py']
model = 'stabilityai/stable-diffusion-xl-base-1.0'
resolution = 1024
work_dir = 'work_dirs/lora/ade20k_sdxl'
