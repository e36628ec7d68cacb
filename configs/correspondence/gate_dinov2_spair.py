# GATE's features beside DINOv2's, as the strongest correspondence systems fuse them
# ("A Tale of Two Features" / SD-DINO, GeoAware-SC, DIY-SC): the authors' recipe
# (gate_spair.py) plus a DINOv2 ViT-B/14 source (its last layer's patch tokens; 512 inputs
# seen at 448, 32 x 32 patches). Trained: the DINOv2 map enters the authors' aggregation
# network beside the attention maps (concatenated after the amalgamation, then the 3x3 conv).
# Zero-shot: SD-DINO's fusion -- each source's features L2-normalised, weighted, concatenated.
#   python tools/correspondence.py train configs/correspondence/gate_dinov2_spair.py
#   python tools/correspondence.py zero-shot configs/correspondence/gate_dinov2_spair.py
_base_ = ['./gate_spair.py']
source = dict(sources=dict(
    dino=dict(type='DINOv2Source', model='facebook/dinov2-base',
              taps=('last_hidden_state', ), input_scale=0.875, frozen_dtype='auto')))
aggregator = dict(bypass=('attn.cross_attention_maps', 'dino.last_hidden_state'))
zero_shot = dict(weights=dict(conv=1.0, attn=1.0, dino=1.0))
work_dir = 'work_dirs/correspondence/gate_dinov2_spair'
