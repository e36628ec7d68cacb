# The paper's GATE recipe for standard segmentation: three variants of Stable Diffusion -- the
# prompt alone; the Canny ControlNet with LoRA A; the Canny ControlNet with LoRA B --
# amalgamated by the backbone. A config takes it beside its model base and names its LoRAs:
#   _base_ = [..., './_base_/gate_recipe.py']
#   model = dict(backbone=dict(source=dict(controlnets={{_base_.gate_controlnets}},
#                                          loras=dict(a=..., b=...),
#                                          variants={{_base_.gate_variants}})))
# (variables, because MMEngine does not merge one key from two bases).
# The Canny detector with its own thresholds, 100 / 200 (the paper's).
gate_canny = dict(type='canny')
gate_controlnets = dict(canny=dict(model='lllyasviel/sd-controlnet-canny', condition=gate_canny))
gate_variants = [
    dict(),
    dict(controlnets=dict(canny=1.0), lora='a'),
    dict(controlnets=dict(canny=1.0), lora='b'),
]
