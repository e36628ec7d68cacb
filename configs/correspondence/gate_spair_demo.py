# The correspondence protocol at toy scale on the CPU: the demo's tiny model and LoRA on
# synthetic pairs in SPair-71k's layout (a scene and its shifted, scaled, sometimes mirrored
# copy, with the keypoints moved along; `tools/make_demo.py` writes them).
#   python tools/correspondence.py train configs/correspondence/gate_spair_demo.py
_base_ = ['./gate_spair.py']
source = dict(
    sd_model='data/demo/tiny-sd',
    prompt='a photo of a cat and a dog, high quality',
    controlnets=dict(canny=dict(model='data/demo/controlnet-canny')),
    loras=dict(a='data/demo/lora/lora_step100.safetensors',
               b='data/demo/lora/lora_step200.safetensors'),
    taps=('up_blocks.1.upsamplers.0', 'up_blocks.2.upsamplers.0', 'up_blocks.3.attentions.1'))
data = dict(root='data/demo/spair', image_size=64, val_per_category=None)
aggregator = dict(projection_dim=64)
train = dict(steps=300, val_every=100)
work_dir = 'work_dirs/correspondence/gate_spair_demo'
