"""Checkpoints: nothing in them runs, loads are complete, resume is exact, saves are atomic."""
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.fileio.backends import LocalBackend
from mmengine.logging import HistoryBuffer

from mmseg.registry import RUNNERS
from mmseg_gate.engine.checkpoint import UnsafeCheckpointError, read_checkpoint

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_nothing_is_allow_listed_for_unpickling():
    names = [str(g) for g in torch.serialization.get_safe_globals()]
    assert not [n for n in names if 'numpy' in n or 'mmengine' in n or 'getattr' in n]


def test_checkpoint_is_plain_data(make_demo_cfg, tmp_path):
    RUNNERS.build(make_demo_cfg(tmp_path, 2)).train()
    checkpoint = torch.load(tmp_path / 'iter_2.pth', weights_only=True)  # no allow-list
    assert checkpoint['message_hub']['log_scalars']['train/loss']['log_history'].numel() == 2
    assert {'torch', 'numpy', 'python', 'modules'} <= set(checkpoint['random_state'])
    assert checkpoint['random_state']['modules']['backbone'] is not None  # training noise


def test_resume_never_runs_code_from_the_checkpoint(make_demo_cfg, tmp_path):
    RUNNERS.build(make_demo_cfg(tmp_path, 2)).train()
    path = tmp_path / 'iter_2.pth'
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / 'code-ran'
    # Runner.resume passes meta['config'] to Config.fromstring(..., '.py'), which executes it.
    checkpoint['meta']['config'] = f'import pathlib\npathlib.Path({str(marker)!r}).touch()\n'
    torch.save(checkpoint, path)
    cfg = make_demo_cfg(tmp_path, 4)
    cfg.resume = True
    runner = RUNNERS.build(cfg)
    runner.train()
    assert runner.iter == 4
    assert not marker.exists()


class CraftedHistoryBuffer:
    """Pickles as a HistoryBuffer whose state replaces the class-wide statistics table."""

    def __reduce__(self):
        state = dict(max_length=10, _log_history=[1.0], _count_history=[1],
                     statistics_methods={'mean': 'not a function'})
        return HistoryBuffer, (), state


@pytest.mark.parametrize('payload', [
    CraftedHistoryBuffer(),
    np.arange(3.0),
    np.float64(1.5),
    np.zeros(2, dtype=[('a', 'O')]),  # an object field: raw file bytes read as pointers
], ids=['history-buffer', 'numpy-array', 'numpy-scalar', 'numpy-object-field'])
def test_crafted_payloads_are_rejected(payload, tmp_path):
    path = tmp_path / 'crafted.pth'
    torch.save({'state_dict': {}, 'message_hub': {'log_scalars': {'loss': payload}}}, path)
    table = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(UnsafeCheckpointError, match=f'(?s){path}.*not plain data'):
        read_checkpoint(str(path))
    assert HistoryBuffer._statistics_methods == table
    assert HistoryBuffer._statistics_methods['mean'] is HistoryBuffer.mean


def test_mmengine_loads_local_files_safely_too(make_demo_cfg, tmp_path):
    """load_from, init_cfg=Pretrained and mmseg.apis.init_model use MMEngine's loader; a
    GATERunner registers the safe reader as its local-file loader when it is built (importing
    mmseg_gate replaces nothing)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    path = tmp_path / 'crafted.pth'
    torch.save({'state_dict': {}, 'x': CraftedHistoryBuffer()}, path)
    RUNNERS.build(make_demo_cfg(tmp_path / 'run', 1))
    with pytest.raises(UnsafeCheckpointError):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / 'torn.pth'
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=f'(?s){path}.*truncated'):
        read_checkpoint(str(path))


def test_load_from_a_mismatching_checkpoint_fails(make_demo_cfg, tmp_path):
    RUNNERS.build(make_demo_cfg(tmp_path / 'a', 2)).train()
    cfg = make_demo_cfg(tmp_path / 'b', 2)
    cfg.model.decode_head.num_classes = 7  # not the checkpoint's 5
    cfg.load_from = str(tmp_path / 'a' / 'iter_2.pth')
    with pytest.raises(RuntimeError, match='(?s)iter_2.pth.*does not match the model'):
        RUNNERS.build(cfg).test()


def test_killed_run_resumes_bitwise_equal_to_uninterrupted(make_demo_cfg, tmp_path):
    """A run SIGKILLed between checkpoints (after iteration 3 of 4; checkpoint and
    validation at 2) and resumed ends with exactly the weights of an uninterrupted run."""
    def cfg_for(work_dir):
        cfg = make_demo_cfg(work_dir, 4)
        cfg.train_cfg.val_interval = 2
        return cfg

    RUNNERS.build(cfg_for(tmp_path / 'full')).train()

    killed = cfg_for(tmp_path / 'killed')
    killed.custom_imports = dict(imports=['mmseg_gate', 'kill_hook'],
                                 allow_failed_imports=False)
    killed.custom_hooks = [dict(type='KillAfterIterationHook', iteration=3)]
    config = tmp_path / 'killed.py'
    killed.dump(str(config))
    env = dict(os.environ, PYTHONPATH=osp.join(ROOT, 'tests', 'helpers'))
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), str(config)],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / 'killed').glob('*.pth')) == ['iter_2.pth']

    resumed = cfg_for(tmp_path / 'killed')
    resumed.resume = True
    RUNNERS.build(resumed).train()

    full = torch.load(tmp_path / 'full' / 'iter_4.pth', weights_only=True)
    again = torch.load(tmp_path / 'killed' / 'iter_4.pth', weights_only=True)
    assert full['state_dict'].keys() == again['state_dict'].keys()
    differing = [k for k in full['state_dict']
                 if not torch.equal(full['state_dict'][k], again['state_dict'][k])]
    assert differing == []


def test_a_save_killed_midway_leaves_the_previous_checkpoints(make_demo_cfg, tmp_path,
                                                              monkeypatch):
    real_put = LocalBackend.put

    def torn_put(self, obj, filepath):
        if 'iter_4' in str(filepath):
            with open(filepath, 'wb') as f:
                f.write(obj[:len(obj) // 2])
            raise KeyboardInterrupt('killed while saving')
        return real_put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, 'put', torn_put)
    with pytest.raises(KeyboardInterrupt):
        RUNNERS.build(make_demo_cfg(tmp_path, 4)).train()
    assert not (tmp_path / 'iter_4.pth').exists()
    assert read_checkpoint(str(tmp_path / 'iter_2.pth'))['meta']['iter'] == 2
    assert (tmp_path / 'last_checkpoint').read_text().endswith('iter_2.pth')

    monkeypatch.setattr(LocalBackend, 'put', real_put)
    cfg = make_demo_cfg(tmp_path, 4)
    cfg.resume = True
    RUNNERS.build(cfg).train()
    assert read_checkpoint(str(tmp_path / 'iter_4.pth'))['meta']['iter'] == 4
    assert list(tmp_path.glob('*.gate-tmp')) == []


def test_unplain_checkpoint_content_is_refused_at_save():
    from collections import OrderedDict

    from mmseg_gate.engine.checkpoint import check_plain, to_plain
    check_plain({'a': [torch.zeros(1), 1, 'x', None], 'b': OrderedDict(c=(1.0, True))})
    check_plain(to_plain({'palette': np.zeros((2, 3)), 'n': np.int64(3)}))
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a .*HistoryBuffer"):
        check_plain({'x': HistoryBuffer()})


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """safetensors creates owner-only files; what we write follows the umask, like open()."""
    import stat

    from safetensors.torch import save_file

    from mmseg_gate.fileio import atomic_file
    path = str(tmp_path / 'lora.safetensors')
    with atomic_file(path) as tmp:
        save_file({'a': torch.zeros(1)}, tmp)
    plain = tmp_path / 'plain'
    plain.write_text('x')
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_training_state_round_trip(tmp_path):
    """The one resume format of the hand-written loops: plain data, the settings as JSON."""
    from mmseg_gate.engine.checkpoint import (TRAINING_STATE_FORMAT, load_training_state,
                                              save_training_state)
    path = str(tmp_path / 'state.pth')
    settings = dict(lr=1e-4, targets=('to_q', 'to_k'), seed=0, captions=None)
    rng = np.random.default_rng(3).bit_generator.state  # numpy RNG state: a dict of ints
    state = dict(model={'w': torch.arange(3.)}, rng=rng, log=[dict(step=1, loss=0.5)])
    save_training_state(path, 'lora', settings, 7, state)
    raw = torch.load(path, weights_only=True)
    assert raw['format'] == TRAINING_STATE_FORMAT and raw['kind'] == 'lora'
    assert isinstance(raw['settings'], str) and raw['step'] == 7
    step, loaded = load_training_state(path, 'lora', dict(settings, targets=['to_q', 'to_k']))
    assert step == 7 and torch.equal(loaded['model']['w'], state['model']['w'])
    assert loaded['rng'] == rng and loaded['log'] == state['log']
    assert list(tmp_path.iterdir()) == [tmp_path / 'state.pth']  # no temporary left


def test_training_state_refuses_what_it_cannot_resume(tmp_path):
    from mmseg_gate.engine.checkpoint import load_training_state, save_training_state
    path = str(tmp_path / 'last_checkpoint.pt')
    with pytest.raises(TypeError, match=r"\['state'\]\['walk'\] is a numpy.random"):
        save_training_state(path, 'correspondence', {}, 1,
                            dict(walk=np.random.default_rng(0)))
    assert not osp.exists(path)  # nothing written
    settings = dict(steps=20, lr=5e-4, seed=0)
    save_training_state(path, 'correspondence', settings, 4, dict(x=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"'correspondence' run, not of this 'lora' run"):
        load_training_state(path, 'lora', settings)
    with pytest.raises(ValueError) as err:
        load_training_state(path, 'correspondence', dict(settings, lr=1e-3, val_last=False))
    message = str(err.value)
    assert path in message and 'lr: 0.0005 there, 0.001 now' in message
    assert 'val_last: unset there, False now' in message and 'steps' not in message
    assert 'remove it to train from scratch' in message


def test_an_older_training_state_is_named_with_the_fix(tmp_path):
    """Resume files written before the one format (their own dicts, no 'format')."""
    from mmseg_gate.engine.checkpoint import load_training_state
    path = tmp_path / 'last_state.pth'
    torch.save(dict(step=10, log=[], lora={}, generator=torch.zeros(2, dtype=torch.uint8)),
               path)
    with pytest.raises(ValueError, match=r"'.*last_state\.pth' is not a training state this "
                       r'version can resume .*older mmseg_gate version.* Remove it to train '
                       'from scratch'):
        load_training_state(str(path), 'lora', {})
