# LoRA for CityScapes (512x512 centre crops of the training images).
_base_ = ['./_base_.py']
image_dir = 'data/cityscapes/leftImg8bit/train/aachen'
work_dir = 'work_dirs/lora/cityscapes'
