# GATE + UPerNet on CityScapes: the paper's three variants (prompt only; prompt + Canny
# ControlNet + LoRA A; prompt + Canny ControlNet + LoRA B), learned amalgamation, 1024x1024
# crops at native resolution, 80k iterations, batch 2. The LoRA files come from
#   python tools/train_lora.py configs/lora/cityscapes.py
# Without them use configs/gate_upernet_cityscapes_prompt.py.
_base_ = ['./gate_upernet_cityscapes_prompt.py']
model = dict(
    backbone=dict(
        source=dict(
            class_names='cityscapes',
            append_class_names=True,
            controlnets=dict(
                canny=dict(
                    model='lllyasviel/sd-controlnet-canny',
                    condition=dict(type='canny', low_threshold=100, high_threshold=200))),
            loras=dict(
                a='work_dirs/lora/cityscapes/lora_step1500.safetensors',
                b='work_dirs/lora/cityscapes/lora_step3000.safetensors'),
            variants=[
                dict(),
                dict(controlnets=dict(canny=1.0), lora='a'),
                dict(controlnets=dict(canny=1.0), lora='b'),
            ])))
