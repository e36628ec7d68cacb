# GATE's full recipe on Stable Diffusion 3.5 medium (our extension; the paper guides SD1.5
# only): gate_upernet_ade20k_sd35.py's prompt variant beside the same prompt with a Canny
# ControlNet and with GATE's LoRA, amalgamated per pixel by the learned weights as for SD.
# - ControlNet: InstantX's SD3-medium Canny ControlNet (`SD3ControlNetModel`, the condition
#   latent alone; `hf download InstantX/SD3-Controlnet-Canny --local-dir
#   checkpoints/sd3-canny`). It was trained on SD3 medium, whose transformer has SD3.5
#   medium's width (1,536) and depth (24 joint blocks), so it runs on SD3.5 medium; Stability's
#   own SD3.5 ControlNets are for SD3.5 large and take extra conditioning channels, which the
#   DiT source refuses. Measure whether it suppresses content shift at this block first:
#   python tools/content_shift.py configs/gate_upernet_ade20k_sd35_gate.py IMAGES.
# - LoRA: `python tools/train_lora.py configs/lora/ade20k_sd35.py` (the flow-matching
#   objective of diffusers' SD3 LoRA script, rank 64, 30 images, 3,000 steps); the moderate
#   checkpoint, as the paper's LoRA A.
# All three variants run as one transformer batch (the LoRA chosen per sample by peft's
# mixed-adapter batches); the ControlNet runs once.
_base_ = ['./gate_upernet_ade20k_sd35.py']
model = dict(
    backbone=dict(
        source=dict(
            controlnets=dict(canny=dict(model='InstantX/SD3-Controlnet-Canny',
                                        condition=dict(type='canny'))),
            loras=dict(a='work_dirs/lora/ade20k_sd35/lora_step1500.safetensors'),
            variants=[dict(), dict(controlnets=dict(canny=1.0)), dict(lora='a')])))
