# LoRA for Bedroom-28 (label-scarce): 30 of its training images; lora_step1500 is used by
# configs/label_scarce/gate_pixel_bedroom28.py.
_base_ = ['./_base_.py']
image_dir = 'datasets/bedroom_28/real/train'
work_dir = 'work_dirs/lora/bedroom28'
