# GATE + UPerNet on ADE20K: the paper's three variants (prompt only; prompt + Canny ControlNet
# + LoRA A; prompt + Canny ControlNet + LoRA B), learned amalgamation, 512x512 crops, 80k
# iterations, batch 2. The LoRA files come from
#   python tools/train_lora.py configs/lora/ade20k.py
# (A: a moderate checkpoint, B: a slightly overfit one). Without them use
# configs/gate_upernet_ade20k_prompt.py.
_base_ = ['./gate_upernet_ade20k_prompt.py', './_base_/gate_recipe.py']
model = dict(
    backbone=dict(
        source=dict(
            class_names='ade20k',
            append_class_names=True,
            controlnets={{_base_.gate_controlnets}},
            loras=dict(
                a='work_dirs/lora/ade20k/lora_step1500.safetensors',
                b='work_dirs/lora/ade20k/lora_step3000.safetensors'),
            variants={{_base_.gate_variants}})))
