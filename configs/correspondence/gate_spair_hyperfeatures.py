# An option beside the authors' recipe: Diffusion Hyperfeatures' aggregation on the same
# features -- GATE's amalgamation per level (the attention maps as a level of their own),
# DHF's bottleneck to 384 channels per level and learned level mixing; matching with the
# target upsampled 4x, keypoints as pixel centres; a fixed sparsity lambda of 0.
#   python tools/correspondence.py train configs/correspondence/gate_spair_hyperfeatures.py
_base_ = ['./gate_spair.py']
aggregator = dict(_delete_=True, type='CorrespondenceAggregator', projection_dim=384,
                  num_assigners=1)
matching = dict(_delete_=True, upsample=4, pixel_centres=True)
train = dict(sparsity=0.0, steps_per_epoch=None)
work_dir = 'work_dirs/correspondence/gate_spair_hyperfeatures'
