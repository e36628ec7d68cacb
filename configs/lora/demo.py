# LoRA for the embedded demo (tiny model, CPU): two checkpoints, moderate and overfit.
_base_ = ['./_base_.py']
model = 'data/demo/tiny-sd'
image_dir = 'data/demo/ade/ADEChallengeData2016/images/training'
work_dir = 'data/demo/lora'
resolution = 64
rank = 8
alpha = 4
unet_lr = 1e-4  # the paper's; 1e-3 makes the random tiny UNet's LoRA features mostly noise
steps = 200
batch_size = 4
save_every = 100
log_every = 25
