# GATE + DINOv2 at toy scale on the CPU: the correspondence demo (gate_spair_demo.py) plus a
# tiny random DINOv2 (`tools/make_demo.py`) at the demo's 64x64 (seen at 56: 4 x 4 patches).
#   python tools/correspondence.py train configs/correspondence/gate_dinov2_spair_demo.py
#   python tools/correspondence.py zero-shot configs/correspondence/gate_dinov2_spair_demo.py
_base_ = ['./gate_spair_demo.py']
source = dict(sources=dict(
    dino=dict(type='DINOv2Source', model='data/demo/tiny-dinov2',
              taps=('last_hidden_state', ), input_scale=0.875, frozen_dtype='auto')))
aggregator = dict(bypass=('attn.cross_attention_maps', 'dino.last_hidden_state'))
zero_shot = dict(weights=dict(conv=1.0, attn=1.0, dino=1.0))
work_dir = 'work_dirs/correspondence/gate_dinov2_spair_demo'
