# Semantic correspondence on SPair-71k with the GATE authors' validation as well
# (`correspondence_gate/task-corres.py`, Darkbblue/diffusion-content-shift @81a7cae): the
# shipped config's recipe, validated as theirs is --
# - the network left in train mode (each pair in one batch: BatchNorm over the pair, dropout
#   active), so every validation is a noisy one, and the paper's figure is the maximum over
#   them (`paper` in results_train.json);
# - after 501, 1001, ..., 9501 updates (their 0-based step counter), not after the last:
#   19 validations.
# What still differs is in docs/correspondence.md's table.
#   python tools/correspondence.py train configs/correspondence/gate_spair_authors.py
_base_ = ['./gate_spair.py']
train = dict(val_mode='train', val_offset=1, val_last=False)
work_dir = 'work_dirs/correspondence/gate_spair_authors'
