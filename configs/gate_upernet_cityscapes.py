# GATE + UPerNet on CityScapes: the paper's three variants (prompt only; prompt + Canny
# ControlNet + LoRA A; prompt + Canny ControlNet + LoRA B), learned amalgamation, 1024x1024
# crops at native resolution, 80k iterations, batch 2. The LoRA files come from
#   python tools/train_lora.py configs/lora/cityscapes.py
# Without them use configs/gate_upernet_cityscapes_prompt.py.
_base_ = ['./gate_upernet_cityscapes_prompt.py', './_base_/gate_recipe.py']
model = dict(
    backbone=dict(
        source=dict(
            class_names='cityscapes',
            append_class_names=True,
            controlnets={{_base_.gate_controlnets}},
            loras=dict(
                a='work_dirs/lora/cityscapes/lora_step1500.safetensors',
                b='work_dirs/lora/cityscapes/lora_step3000.safetensors'),
            variants={{_base_.gate_variants}})))
