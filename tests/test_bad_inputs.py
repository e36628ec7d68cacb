"""Bad input to the protocol tools, the content-shift tool and the caption tool: each ends
with an error of ours that names the file (or the argument) and the problem."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from PIL import Image

from mmseg.registry import DATASETS
from mmseg_gate.datasets.spair import load_pairs
from mmseg_gate.testing.demo_data import (write_ddpm_seg_layout_dataset,
                                          write_spair_layout_dataset)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLASSES = ('wall', 'building', 'sky', 'floor', 'tree')


# -- tools/label_scarce.py: the dataset it builds -----------------------------------------

def scarce_dataset(root, pipeline=({'type': 'LoadNpyAnnotations'}, )):
    return DATASETS.build(dict(type='DDPMSegDataset', data_root=root,
                               metainfo=dict(classes=CLASSES),
                               data_prefix=dict(img_path='real/train',
                                                seg_map_path='real/train'),
                               pipeline=list(pipeline)))


@pytest.fixture
def scarce_root(tmp_path):
    root = tmp_path / 'horse_21'
    write_ddpm_seg_layout_dataset(str(root), num_train=3, num_test=1, size=32)
    return root


def test_label_with_a_class_beyond_the_dataset(scarce_root):
    label = np.load(scarce_root / 'real/train/1.npy')
    label[0, 0] = 9
    np.save(scarce_root / 'real/train/1.npy', label)
    with pytest.raises(ValueError, match=r"(?s)1\.npy.*class id\(s\) \[9\].*5 classes"):
        scarce_dataset(str(scarce_root))


def test_label_of_another_size_than_its_image(scarce_root):
    np.save(scarce_root / 'real/train/2.npy', np.zeros((16, 32), np.uint8))
    with pytest.raises(ValueError, match=r"(?s)2\.npy.*16x32.*2\.png.*32x32"):
        scarce_dataset(str(scarce_root))


def test_truncated_image(scarce_root):
    path = scarce_root / 'real/train/0.png'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    dataset = scarce_dataset(str(scarce_root), [dict(type='LoadAnyImage'),
                                                dict(type='LoadNpyAnnotations')])
    with pytest.raises(ValueError, match=r"(?s)0\.png.*truncated"):
        dataset[0]


def test_label_scarce_configs_read_images_with_the_project_reader():
    from mmengine.config import Config
    for name in ('gate_pixel_horse21', 'gate_pixel_bedroom28', 'gate_pixel_demo'):
        cfg = Config.fromfile(osp.join(ROOT, 'configs', 'label_scarce', f'{name}.py'))
        for loader in (cfg.train_dataloader, cfg.test_dataloader):
            assert loader.dataset.pipeline[0].type == 'LoadAnyImage', name


def test_label_scarce_tool_errors_are_one_message(scarce_root, scarce_demo_options, tiny,
                                                  tmp_path, run_tool_here):
    """A file given as the store folder, and a truncated ADM checkpoint: one message of ours
    naming the file, exit status 1, no traceback."""
    options = [*scarce_demo_options, f'train_dataloader.dataset.data_root={scarce_root}',
               f'test_dataloader.dataset.data_root={scarce_root}']
    config = osp.join(ROOT, 'configs', 'label_scarce', 'gate_pixel_demo.py')
    not_a_folder = tmp_path / 'store.txt'
    not_a_folder.write_text('a file')
    result = run_tool_here('label_scarce', config, '--splits', '0', '--work-dir', str(tmp_path / 'a'),
                  '--features', str(not_a_folder), '--cfg-options', *options)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert f"[label_scarce] error: The feature store '{not_a_folder}' is a file, not a " \
        'folder' in result.stderr
    data = open(tiny['adm'], 'rb').read()
    truncated = tmp_path / 'adm.pt'
    truncated.write_bytes(data[:len(data) // 2])
    result = run_tool_here('label_scarce', config, '--splits', '0', '--work-dir', str(tmp_path / 'b'),
                  '--cfg-options', *options,
                  f'model.backbone.source.sources.adm.model={truncated}')
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert f"Checkpoint '{truncated}' cannot be read" in result.stderr


# -- tools/correspondence.py -------------------------------------------------------------

@pytest.fixture
def spair_root(tmp_path):
    root = tmp_path / 'SPair-71k'
    write_spair_layout_dataset(str(root), dict(test=2), size=64)
    return root


def annotation(root, index=0):
    name = (root / 'Layout/large/test.txt').read_text().split()[index]
    return root / 'PairAnnotation' / 'test' / f'{name}.json'


def test_pair_annotation_that_is_not_json(spair_root):
    path = annotation(spair_root)
    path.write_text('{"src_imname": "x.jpg", ')
    with pytest.raises(ValueError, match=rf"(?s){path.name}.*not valid JSON"):
        load_pairs(str(spair_root), 'test')


def test_keypoint_outside_its_image(spair_root):
    path = annotation(spair_root, 1)
    pair = json.loads(path.read_text())
    pair['trg_kps'][2] = [500, -40]
    path.write_text(json.dumps(pair))
    with pytest.raises(ValueError, match=r"(?s)trg keypoint.*\[500, -40\].*outside the 64x64"):
        load_pairs(str(spair_root), 'test')


def test_a_rerun_never_replaces_a_better_model(tiny, tmp_path):
    from mmseg_gate import StableDiffusionSource
    from mmseg_gate.models.correspondence import CorrespondenceAggregator
    from mmseg_gate.protocols.correspondence import FeatureCache, train_aggregator
    root = tmp_path / 'SPair-71k'
    write_spair_layout_dataset(str(root), dict(trn=2, val=2), size=64)
    source = StableDiffusionSource(model=tiny['sd_model'])
    cache = FeatureCache(source, 64)
    pairs = load_pairs(str(root), 'trn'), load_pairs(str(root), 'val')
    work = tmp_path / 'work'
    work.mkdir()

    def train(steps):
        torch.manual_seed(0)
        aggregator = CorrespondenceAggregator(source.feature_info, projection_dim=32)
        return train_aggregator(aggregator, cache, *pairs, str(work), steps=steps,
                                val_every=1, progress=False)

    first = train(2)
    kept = (work / 'best.safetensors').read_bytes()
    log = json.loads((work / 'training.json').read_text())
    log['best']['pck_bbox'] = 100.5  # an earlier model no rerun can beat
    (work / 'training.json').write_text(json.dumps(log))
    second = train(2)
    assert (work / 'best.safetensors').read_bytes() == kept
    assert second['best']['earlier_run'] and second['best']['pck_bbox'] == 100.5
    assert first['best']['pck_bbox'] <= 100
    (work / 'training.json').write_text('{"history": []}')
    with pytest.raises(ValueError, match='training.json'):
        train(1)


# -- tools/content_shift.py --------------------------------------------------------------

@pytest.fixture(scope='module')
def shift_config(make_demo_cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp('shift')
    path = folder / 'config.py'
    make_demo_cfg(folder, 1).dump(str(path))
    image = folder / 'image.png'
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    return str(path), str(image)


@pytest.mark.parametrize('args,message', [
    (['--timesteps', '1000'], r'--timesteps 1000: timestep must be in \[0, 1000\)'),
    (['--timesteps', '-1'], r'--timesteps -1: timestep must be in \[0, 1000\)'),
    (['--anchor-timestep', '1000'], r'--anchor-timestep 1000'),
    (['--variants', '7'], r"--variants 7: config '.*' has 3 variant\(s\), numbered 0-2"),
    (['--baseline', '5'], r'--baseline 5: there are 3 variant\(s\)'),
])
def test_content_shift_arguments(shift_config, tmp_path, args, message, run_tool_here):
    config, image = shift_config
    result = run_tool_here('content_shift', config, image, '--out', str(tmp_path), '--size', '32',
                  '--no-reconstruct', '--no-progress', *args)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert __import__('re').search(message, result.stderr), result.stderr[-2000:]


def test_content_shift_text_file_named_jpg(shift_config, tmp_path, run_tool_here):
    config, _ = shift_config
    fake = tmp_path / 'photo.jpg'
    fake.write_text('hello')
    result = run_tool_here('content_shift', config, str(fake), '--out', str(tmp_path / 'out'),
                  '--no-reconstruct', '--no-progress')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert "photo.jpg' cannot be read" in result.stderr and 'not an image' in result.stderr


# -- tools/caption.py --------------------------------------------------------------------

@pytest.mark.parametrize('model', ['/nonexistent/models/blip', './models/blip'])
def test_caption_model_folder_that_does_not_exist(tmp_path, model, run_tool_here):
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (8, 8)).save(images / 'a.png')
    result = run_tool_here('caption', str(images), '--out', str(tmp_path / 'c.json'), '--model', model,
                  '--device', 'cpu')
    assert result.returncode != 0
    assert f"Captioning model folder '{model}' does not exist" in result.stderr
    assert 'Repo id' not in result.stderr
