# GATE features of FLUX.1-dev (19 double-stream + 38 single-stream blocks, 3,072 channels) +
# UPerNet on ADE20K: as gate_upernet_ade20k_sd35.py, the last double-stream block, the
# guidance embedding at 3.5, bfloat16 (FLUX's 12B parameters: 24 GB in bfloat16; the source
# frees the 38 single-stream blocks it never reaches and drops the text encoders after
# encoding the prompt).
_base_ = ['./gate_upernet_ade20k_sd35.py']
dit_channels = 3072
model = dict(
    backbone=dict(
        source=dict(model='black-forest-labs/FLUX.1-dev',
                    taps=('transformer_blocks.18', ), guidance_scale=3.5,
                    frozen_dtype='bfloat16')),
    neck=dict(in_channels=[dit_channels]))
