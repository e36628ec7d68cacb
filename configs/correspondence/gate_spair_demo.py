# The correspondence protocol at toy scale on the CPU: the demo's tiny model, ControlNet and
# LoRAs on synthetic pairs in SPair-71k's layout, with Diffusion Hyperfeatures' split files of
# the same pairs (a scene and its shifted, scaled, sometimes mirrored copy, with the keypoints
# moved along; `tools/make_demo.py` writes them). The authors' recipe at 64x64: the six
# variants and the separate attention run, their aggregation network on an 8x8 grid,
# matching at 64x64.
#   python tools/correspondence.py train configs/correspondence/gate_spair_demo.py
_base_ = ['./gate_spair.py']
_tiny = dict(model='data/demo/tiny-sd',
             controlnets=dict(canny=dict(model='data/demo/controlnet-canny')))
source = dict(sources=dict(
    conv=dict(_tiny, prompt='a photo of a cat and a dog, high quality',
              loras=dict(a='data/demo/lora/lora_step100.safetensors',
                         b='data/demo/lora/lora_step200.safetensors'),
              taps=('up_blocks.1.upsamplers.0', 'up_blocks.2.upsamplers.0',
                    'up_blocks.3.attentions.1')),
    attn=dict(_tiny, prompt='a photo of a cat and a dog',
              loras=dict(a='data/demo/lora/lora_step100.safetensors'))))
data = dict(root='data/demo/spair', image_size=64, val_per_category=None)
aggregator = dict(grid=8)
matching = dict(size=64)
train = dict(steps=300, steps_per_epoch=None, val_every=100)
work_dir = 'work_dirs/correspondence/gate_spair_demo'
