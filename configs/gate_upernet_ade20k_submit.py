# ADE20K leaderboard submission: predict the 3,352 test images (release_test.zip, unpacked to
# data/ade/release_test/testing/*.jpg) and write PNGs with ADE20K's 1-150 ids, no evaluation.
#   python tools/test.py configs/gate_upernet_ade20k_submit.py CKPT
_base_ = ['./gate_upernet_ade20k.py']
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    dataset=dict(
        data_root='data/ade/release_test',
        data_prefix=dict(img_path='testing', seg_map_path=''),
        pipeline=test_pipeline))
test_evaluator = dict(
    type='IoUMetric', format_only=True,
    output_dir='work_dirs/gate_upernet_ade20k_submit/predictions')
