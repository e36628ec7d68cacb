"""Every way the backbone can be misconfigured says what is wrong and how to fix it."""
import os
import shutil

import pytest
import torch

from mmseg_gate import GATEBackbone


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='(?s)does not exist.*hf download'):
        GATEBackbone(source=dict(model=str(tmp_path / 'no-such-model')))


def test_missing_component(tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / 'sd')
    shutil.rmtree(broken / 'unet')
    with pytest.raises(FileNotFoundError, match="no 'unet/' folder"):
        GATEBackbone(source=dict(model=str(broken)))


def test_pickle_weights_rejected(tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / 'sd')
    weights = broken / 'unet' / 'diffusion_pytorch_model.safetensors'
    os.rename(weights, broken / 'unet' / 'diffusion_pytorch_model.bin')
    with pytest.raises(ValueError, match=r'(?s)no \.safetensors.*diffusion_pytorch_model\.bin.*'
                                         'safe_serialization=True'):
        GATEBackbone(source=dict(model=str(broken)))


def test_unknown_hub_model_fails_offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(OSError, match='(?s)not a local folder.*Download it first'):
        GATEBackbone(source=dict(model='nobody-here/no-such-model'))


def test_wrong_channel_count(backbone):
    with pytest.raises(ValueError, match=r'expects images as \(N, 3, H, W\).*3 channels'):
        backbone(torch.randn(1, 4, 64, 64))


@pytest.mark.parametrize('tap', ['up_blocks.7.upsamplers.0', 'conv_out'])
def test_bad_tap(tiny_sd, tap):
    with pytest.raises(KeyError, match='(?i)tap'):
        GATEBackbone(source=dict(model=tiny_sd, taps=[tap]))


def test_bad_timestep(tiny_sd):
    with pytest.raises(ValueError, match=r'timestep must be in \[0, 1000\)'):
        GATEBackbone(source=dict(model=tiny_sd, timestep=1000))


def test_bad_dtype(tiny_sd):
    with pytest.raises(ValueError, match='frozen_dtype'):
        GATEBackbone(source=dict(model=tiny_sd, frozen_dtype='float8'))
