# LoRA for Horse-21 (label-scarce): 30 of its training images; keep e.g. lora_step1500
# (moderate) and lora_step3000 (slightly overfit) for configs/label_scarce/gate_pixel_horse21.py.
_base_ = ['./_base_.py']
image_dir = 'datasets/horse_21/real/train'
work_dir = 'work_dirs/lora/horse21'
