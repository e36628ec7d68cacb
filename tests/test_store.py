"""The feature store: extraction equals the source, resumes and distributes to the same bytes,
refuses what does not match, and serves MMSeg and the protocols."""
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmseg_gate.datasets.image_lists import ImageList, dataset_images, folder_images
from mmseg_gate.datasets.images import pixel_key
from mmseg_gate.sources import build_source
from mmseg_gate.store import FeatureStore, StoreError, StoredSource, extract_features

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'label_scarce', 'gate_pixel_demo.py')


def write_images(folder, count: int, size: int = 32, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size + 8 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(osp.join(folder, f'{i:02d}.png'))
    return str(folder)


@pytest.fixture(scope='module')
def source_cfg(gate_kwargs):
    return dict(gate_kwargs, timestep=50)


@pytest.fixture(scope='module')
def source(source_cfg):
    return build_source(source_cfg)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return folder_images(write_images(tmp_path_factory.mktemp('images'), 3))


@pytest.fixture(scope='module')
def store32(source_cfg, source, images, tmp_path_factory) -> FeatureStore:
    folder = str(tmp_path_factory.mktemp('store32'))
    return extract_features(source_cfg, images, folder, noise_seed=3, dtype='float32',
                            progress=False, make_source=lambda cfg: source)


def test_stored_features_are_the_sources(store32, source, images):
    """float32: bitwise the source's call on the image with its own noise (drawn from the
    seed and its pixels); another image's noise would give other features."""
    from mmseg_gate.sources.common.latents import PerImageNoise
    assert len(store32) == 3 and store32.variant_names == source.variant_names
    assert store32.header['noise'].startswith('per image')
    first = images.load(0)[None]
    name = source.feature_info[0]['module']
    others = source(first, generator=PerImageNoise(3, [pixel_key(images.load(1))]))
    assert not torch.allclose(store32.features(0)[0][name], others[0][name], atol=1e-3)
    for i in range(len(images)):
        image = images.load(i)[None]
        expected = source(image, generator=PerImageNoise.for_images(image, 3))
        stored = store32.features(i)
        assert [sorted(v) for v in stored] == [sorted(v) for v in expected]
        for got, want in zip(stored, expected):
            for name in want:
                assert torch.equal(got[name], want[name]), name
    cost = store32.manifest['cost']
    assert cost['images'] == 3 and cost['flops'] > 0
    assert cost['passes']['vae_encodes'] == 3 and cost['passes']['unet_passes'] == 9
    # Nothing in a store runs code: JSON and safetensors only.
    files = [f for _, _, names in os.walk(store32.folder) for f in names]
    assert {osp.splitext(f)[1] for f in files} == {'.json', '.safetensors', '.lock'}
    with open(osp.join(store32.folder, 'extraction.lock')) as f:
        assert f.read() == str(os.getpid())  # the lock's holder, for the message


def test_float16_store_and_resized_reads(source_cfg, source, images, store32, tmp_path):
    half = extract_features(source_cfg, images, str(tmp_path), noise_seed=3, progress=False,
                            make_source=lambda cfg: source)
    name = source.feature_info[0]['module']
    full, low = store32.feature(0, 1, name), half.feature(0, 1, name)
    assert low.dtype == torch.float32 and torch.allclose(low, full, rtol=1e-3, atol=1e-3)
    resized = store32.feature(0, 1, name, size=(32, 32))
    assert torch.allclose(resized, F.interpolate(full[None], size=(32, 32), mode='bilinear',
                                                 align_corners=False)[0])


def test_pixel_samples_equal_resizing_the_whole_map(store32, source):
    names = [f['module'] for f in source.feature_info]
    size = (32, 32)
    ys, xs = torch.randint(0, 32, (50, )), torch.randint(0, 32, (50, ))
    sampled = store32.sample_pixels(0, ys, xs, size, names, variant=2)
    whole = torch.cat([store32.feature(0, 2, n, size=size) for n in names])
    assert torch.allclose(sampled, whole[:, ys, xs].t(), atol=1e-5)


def test_a_mismatching_store_is_refused_by_field(source_cfg, store32, images, tiny_loras):
    other = dict(source_cfg, timestep=40, loras=dict(a=tiny_loras['b'], b=tiny_loras['a']))
    with pytest.raises(StoreError) as err:
        extract_features(other, images, store32.folder, noise_seed=3, dtype='float32')
    message = str(err.value)
    assert 'source.timestep' in message and 'files.source.loras.a' in message
    with pytest.raises(StoreError, match='noise_seed'):
        StoredSource(store32.folder, source=source_cfg, noise_seed=4, dtype='float32')
    with pytest.raises(StoreError, match='images'):
        extract_features(source_cfg, images.limited(2), store32.folder, noise_seed=3,
                         dtype='float32')
    assert len(StoredSource(store32.folder, source=source_cfg, noise_seed=3,
                            dtype='float32').store) == 3


def test_truncated_and_missing_shards_are_named_and_repaired(source_cfg, source, images,
                                                            tmp_path):
    folder = str(tmp_path)
    store = extract_features(source_cfg, images, folder, progress=False,
                             make_source=lambda cfg: source)
    shard = osp.join(folder, store.records[1]['shard'])
    data = open(shard, 'rb').read()
    with open(shard, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(StoreError, match='000001.safetensors.*truncated'):
        FeatureStore(folder)
    os.remove(shard)
    with pytest.raises(StoreError, match='000001.safetensors.*missing'):
        FeatureStore(folder)
    # What a kill inside safetensors' own write leaves (its writer goes through a hidden
    # '.tmpXXXXXX' file), and one of ours: both removed by the rerun.
    for leftover in ('.tmpCUPjDz', '000001.safetensors.gate-tmp'):
        open(osp.join(folder, 'shards', leftover), 'wb').write(b'partial')
    repaired = extract_features(source_cfg, images, folder, progress=False,
                                make_source=lambda cfg: source)
    assert open(shard, 'rb').read() == data and len(repaired) == 3
    assert sorted(os.listdir(osp.join(folder, 'shards'))) == [
        f'{i:06d}.safetensors' for i in range(3)]


def test_a_store_without_its_manifest_is_never_relabelled(source_cfg, source, images,
                                                          tmp_path):
    """The manifest lost, a rerun with another config refuses the old shards (each records
    its settings and image); a rerun with the same config adopts them."""
    folder = str(tmp_path / 'store')
    first = extract_features(source_cfg, images, folder, progress=False,
                             make_source=lambda cfg: source)
    shards = _store_bytes(osp.join(folder, 'shards'))
    os.remove(osp.join(folder, 'manifest.json'))
    for other, field in ((dict(source_cfg, timestep=40), 'source.timestep'),
                         (dict(source_cfg, prompt='another prompt'), 'source.prompt')):
        with pytest.raises(StoreError, match=rf"(?s)000000\.safetensors.*{field}.*manifest"):
            extract_features(other, images, folder, progress=False,
                             make_source=lambda cfg: source)
        assert not osp.exists(osp.join(folder, 'manifest.json'))  # nothing relabelled
    with pytest.raises(StoreError, match='noise_seed'):
        extract_features(source_cfg, images, folder, noise_seed=5, progress=False,
                         make_source=lambda cfg: source)
    # The same settings over other images in the same places: refused by image.
    other_images = ImageList([f'x{i}' for i in range(3)], images.paths, images.load)
    with pytest.raises(StoreError, match=r"(?s)image: the shard holds '.*', asked for 'x0'"):
        extract_features(source_cfg, other_images, folder, progress=False,
                         make_source=lambda cfg: source)
    built = []
    again = extract_features(source_cfg, images, folder, progress=False,
                             make_source=lambda cfg: built.append(1) or source)
    assert built == [] and again.header == first.header
    assert _store_bytes(osp.join(folder, 'shards')) == shards
    # A shard of an older version (no settings recorded) without a manifest to vouch for it.
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = osp.join(folder, 'shards', '000001.safetensors')
    with safe_open(path, framework='pt') as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        record = json.loads(f.metadata()['record'])
    del record['settings']
    save_file(tensors, path, metadata=dict(record=json.dumps(record)))
    os.remove(osp.join(folder, 'manifest.json'))
    with pytest.raises(StoreError, match=r"(?s)000001\.safetensors.*older mmseg_gate.*no "
                                         'manifest'):
        extract_features(source_cfg, images, folder, progress=False,
                         make_source=lambda cfg: source)


def test_a_second_extraction_into_a_busy_store_stops_clearly(source_cfg, source, images,
                                                             tmp_path):
    """One extraction at a time per store: another process holding the store's lock makes
    this one stop at once, naming it; once that process is gone (killed: the kernel drops
    its lock), the extraction runs."""
    folder = tmp_path / 'store'
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time\nfrom mmseg_gate.fileio import exclusive_lock'
         '\nwith exclusive_lock(sys.argv[1]):\n    print("locked", flush=True)\n'
         '    time.sleep(3600)', str(folder / 'extraction.lock')],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(StoreError, match=rf'(?s)Another extraction is writing.*'
                                             rf'process {holder.pid}'):
            extract_features(source_cfg, images, str(folder), progress=False,
                             make_source=lambda cfg: source)
    finally:
        holder.kill()
        holder.wait()
    store = extract_features(source_cfg, images, str(folder), progress=False,
                             make_source=lambda cfg: source)
    assert len(store) == 3


def test_temporaries_are_unique_per_write():
    from mmseg_gate.fileio import TMP_SUFFIX, temporary_name
    first, second = temporary_name('/x/000000.safetensors'), temporary_name(
        '/x/000000.safetensors')
    assert first != second and first.endswith(TMP_SUFFIX) and str(os.getpid()) in first


def test_a_bad_image_is_named_and_the_finished_ones_stay(source_cfg, source, tmp_path):
    folder = write_images(tmp_path / 'images', 3)
    with open(osp.join(folder, '02.png'), 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(StoreError, match='02.png'):
        extract_features(source_cfg, folder_images(folder), str(tmp_path / 'store'),
                         progress=False, make_source=lambda cfg: source)
    assert sorted(os.listdir(tmp_path / 'store' / 'shards')) == ['000000.safetensors',
                                                                 '000001.safetensors']
    write_images(tmp_path / 'fixed', 3)
    os.replace(tmp_path / 'fixed' / '02.png', osp.join(folder, '02.png'))
    built = []
    store = extract_features(source_cfg, folder_images(folder), str(tmp_path / 'store'),
                             progress=False, make_source=lambda cfg: built.append(1) or source)
    assert len(store) == 3 and built == [1]
    # A complete store is reused without building the source.
    extract_features(source_cfg, folder_images(folder), str(tmp_path / 'store'),
                     progress=False, make_source=lambda cfg: built.append(1) or source)
    assert built == [1]


def test_stored_source_in_the_backbone_equals_the_source(source_cfg, store32, images):
    """GATEBackbone on a StoredSource: the same outputs as on the source itself in eval
    mode (its fixed noise), no model loaded; pixels the store lacks are an error."""
    from mmseg_gate import GATEBackbone
    live = GATEBackbone(source=source_cfg, noise_seed=3).eval()
    stored = GATEBackbone(source=dict(type='StoredSource', store=store32.folder,
                                      source=source_cfg, noise_seed=3, dtype='float32'),
                          noise_seed=3).eval()
    stored.load_state_dict(live.state_dict())
    image = images.load(0)[None]
    normalized = image  # the default input_mean/std (127.5) map [-1, 1] to itself
    with torch.no_grad():
        for a, b in zip(live(normalized), stored(normalized)):
            assert torch.allclose(a, b, atol=1e-6)
        with pytest.raises(StoreError, match='not in the feature store'):
            stored(normalized.flip(-1))


def test_pipelines_with_random_augmentation_are_refused():
    from mmengine.config import Config
    cfg = Config.fromfile(CONFIG)
    cfg.train_dataloader.dataset.pipeline.insert(2, dict(type='RandomFlip', prob=0.5))
    with pytest.raises(ValueError, match='RandomFlip'):
        dataset_images(cfg, ('train', ))


def test_pixel_key_survives_the_preprocessors_rounding():
    image = torch.randint(0, 256, (3, 8, 8)).float() / 127.5 - 1
    mean, std = 123.675, 58.395
    roundtrip = ((image + 1) * 127.5 - mean) / std * std + mean
    assert pixel_key(roundtrip / 127.5 - 1) == pixel_key(image)
    assert pixel_key(image.flip(-1)) != pixel_key(image)


def _store_bytes(folder) -> dict:
    """Every file's bytes but the lock's (which holds its last holder's process id)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name == 'extraction.lock':
                continue
            path = osp.join(root, name)
            found[osp.relpath(path, folder)] = open(path, 'rb').read()
    return found


@pytest.fixture(scope='module')
def tool_run(scarce_demo_options, tmp_path_factory):
    """An uninterrupted one-process run of tools/extract_features.py on 8 images."""
    folder = write_images(tmp_path_factory.mktemp('tool-images'), 8)
    out = str(tmp_path_factory.mktemp('tool-store'))
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    command = [sys.executable, osp.join(ROOT, 'tools', 'extract_features.py'), CONFIG,
               '--images', folder, '--no-progress', '--device', 'cpu', '--cfg-options',
               *scarce_demo_options]
    result = subprocess.run([*command, '--out', out], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '8 images complete' in result.stdout
    return dict(command=command, env=env, folder=folder, bytes=_store_bytes(out))


def test_a_killed_extraction_resumes_to_the_same_bytes(tool_run, tmp_path):
    out = str(tmp_path / 'store')
    process = subprocess.Popen([*tool_run['command'], '--out', out], cwd=ROOT,
                               env=tool_run['env'], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    shards = osp.join(out, 'shards')
    while process.poll() is None:
        if osp.isdir(shards) and len(os.listdir(shards)) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait() == -signal.SIGKILL
    assert len([n for n in os.listdir(shards) if n.endswith('.safetensors')]) < 8
    result = subprocess.run([*tool_run['command'], '--out', out], cwd=ROOT,
                            env=tool_run['env'], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = _store_bytes(out)
    assert sorted(got) == sorted(tool_run['bytes'])
    assert [n for n in got if got[n] != tool_run['bytes'][n]] == []


def test_two_processes_extract_what_one_does(tool_run, tmp_path):
    out = str(tmp_path / 'store')
    env = dict(tool_run['env'], PYTHON=sys.executable, PORT='29617', PYTHONPATH='')
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_extract.sh'), CONFIG, '2', '--out', out,
         *tool_run['command'][3:]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'extracting on 2 processes' in result.stdout
    assert _store_bytes(out) == tool_run['bytes']
