"""tools/caption.py: sentences, tags and the CLIP-score filter, read by train_lora."""
import json
import os.path as osp

import pytest

from mmseg_gate.testing.captioners import save_random_blip, save_random_clip, save_random_tagger
from mmseg_gate.testing.demo_data import write_ade_layout_dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade')
    write_ade_layout_dataset(str(root), num_train=3, num_val=0)
    return str(root / 'images' / 'training')


def caption(run_tool_here, images, out, *options):
    result = run_tool_here('caption', images, '--out', out, '--device', 'cpu', '--batch-size',
                           '2', *options)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), json.loads((out.parent / (out.name + '.details.json'))
                                                   .read_text())


def test_sentences(images, tmp_path, run_tool_here):
    model = save_random_blip(str(tmp_path / 'blip'))
    captions, details = caption(run_tool_here, images, tmp_path / 'captions.json', '--model', model,
                                '--max-new-tokens', '5')
    assert sorted(captions) == sorted(details) and len(captions) == 3
    assert all(isinstance(c, str) for c in captions.values())
    assert all(d['clip_score'] is None and d['kept'] for d in details.values())


def test_tags(images, tmp_path, run_tool_here):
    tags = [('wall', 0), ('sky', 0), ('general_rating', 9), ('some_character', 4)]
    model = save_random_tagger(str(tmp_path / 'tagger'), tags)
    captions, _ = caption(run_tool_here, images, tmp_path / 'tags.json', '--style', 'tags', '--model', model)
    for text in captions.values():
        names = [t for t in text.split(', ') if t]
        assert set(names) <= {'wall', 'sky', 'some character'}  # ratings never, '_' -> ' '


def test_clip_filter_and_train_lora_reads_the_file(images, tmp_path, tiny_sd, run_tool_here):
    blip = save_random_blip(str(tmp_path / 'blip'))
    clip = save_random_clip(str(tmp_path / 'clip'))
    captions, details = caption(run_tool_here, images, tmp_path / 'all.json', '--model', blip,
                                '--clip-model', clip)
    scores = [d['clip_score'] for d in details.values()]
    assert all(0 <= s <= 100 for s in scores) and len(captions) == 3
    threshold = sorted(scores)[1]  # keep the two best
    kept, details = caption(run_tool_here, images, tmp_path / 'kept.json', '--model', blip,
                            '--clip-model', clip, '--min-clip-score', str(threshold))
    assert len(kept) == sum(d['clip_score'] >= threshold for d in details.values())
    from mmengine.config import Config

    from mmseg_gate.protocols.lora_training import captions_for
    cfg = Config(dict(captions=str(tmp_path / 'kept.json'), caption=''))
    paths = [osp.join(images, name) for name in sorted(details)]
    assert captions_for(cfg, paths) == [kept.get(osp.basename(p), '') for p in paths]


def test_missing_tagger_files_say_how_to_get_them(images, tmp_path, run_tool_here):
    result = run_tool_here('caption', images, '--out', tmp_path / 'x.json', '--style', 'tags',
                           '--model', tmp_path)
    assert result.returncode != 0 and 'selected_tags.csv' in result.stderr
