# CityScapes benchmark submission: predict leftImg8bit/test and write labelIds PNGs (what the
# server expects; CityscapesMetric converts from train ids), no evaluation.
#   python tools/test.py configs/gate_upernet_cityscapes_submit.py CKPT
_base_ = ['./gate_upernet_cityscapes.py']
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    dataset=dict(
        data_prefix=dict(img_path='leftImg8bit/test', seg_map_path='gtFine/test'),
        pipeline=test_pipeline))
test_evaluator = dict(
    type='CityscapesMetric', format_only=True, keep_results=True,
    output_dir='work_dirs/gate_upernet_cityscapes_submit/predictions')
