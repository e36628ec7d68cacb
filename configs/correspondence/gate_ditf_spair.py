# GATE on DiTF's protocol (ditf_spair.py): the same FLUX.1-dev features, treated as DiTF
# treats them, for GATE's three guided variants -- the prompt alone, the prompt with a Canny
# ControlNet (InstantX's FLUX.1-dev Canny ControlNet), the prompt with a LoRA trained on SPair
# images (`python tools/train_lora.py configs/lora/ade20k_flux.py --cfg-options
# image_dir=data/SPair-71k/JPEGImages/<category> ...`) -- their features averaged (zero-shot:
# each variant's map L2-normalised, the variants averaged). No published figure exists for it.
#   python tools/correspondence.py zero-shot configs/correspondence/gate_ditf_spair.py
_base_ = ['./ditf_spair.py']
source = dict(
    controlnets=dict(canny=dict(model='InstantX/FLUX.1-dev-Controlnet-Canny',
                                condition=dict(type='canny'))),
    loras=dict(a='work_dirs/lora/spair_flux/lora_step1000.safetensors'),
    variants=[dict(), dict(controlnets=dict(canny=1.0)), dict(lora='a')])
work_dir = 'work_dirs/correspondence/gate_ditf_spair'
