# GATE + UPerNet on ADE20K with Stable Diffusion 2.1-base (512 pixels; OpenCLIP-H prompts,
# 1024-d cross-attention): the paper's three variants with SD2.1's Canny ControlNet and LoRAs
# trained on it (python tools/train_lora.py configs/lora/ade20k_sd21.py). SD2.1's UNet has
# SD1.5's channels, so the taps give the same levels: 640/1280/1280 ch at strides 8/16/32.
_base_ = ['./gate_upernet_ade20k.py']
model = dict(
    backbone=dict(
        source=dict(
            model='stabilityai/stable-diffusion-2-1-base',
            controlnets=dict(canny=dict(model='thibaud/controlnet-sd21-canny-diffusers')),
            loras=dict(
                a='work_dirs/lora/ade20k_sd21/lora_step1500.safetensors',
                b='work_dirs/lora/ade20k_sd21/lora_step3000.safetensors'))))
