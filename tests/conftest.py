"""Shared tiny models: built once per session, saved in diffusers format, loaded for real."""
import copy

import pytest
import torch

import mmseg_gate  # noqa: F401
from mmseg.utils import register_all_modules
from mmseg_gate.models.diffusion.architectures import save_random_stable_diffusion

torch.set_num_threads(2)
# What tools/train.py gets from the config's default_scope: MMSeg's registries.
register_all_modules(init_default_scope=True)


@pytest.fixture(scope='session')
def tiny_sd(tmp_path_factory) -> str:
    """Folder of a tiny random Stable Diffusion (diffusers format, safetensors)."""
    return save_random_stable_diffusion(str(tmp_path_factory.mktemp('tiny-sd')), 'tiny', seed=0)


@pytest.fixture(scope='session')
def _backbone(tiny_sd):
    from mmseg_gate import GATEBackbone
    return GATEBackbone(sd_model=tiny_sd, prompt='a photo of a street')


@pytest.fixture
def backbone(_backbone):
    """A fresh copy per test (trainable parts copied, frozen parts shared), in eval mode."""
    return copy.deepcopy(_backbone).eval()


@pytest.fixture(scope='session')
def tiny_controlnet(tiny_sd, tmp_path_factory) -> str:
    """A ControlNet for the tiny UNet whose zero convolutions are not zero (it does something)."""
    from mmseg_gate.models.diffusion.architectures import save_random_controlnet
    return save_random_controlnet(str(tmp_path_factory.mktemp('controlnet')), tiny_sd)


@pytest.fixture(scope='session')
def tiny_loras(tiny_sd, tmp_path_factory) -> dict:
    from mmseg_gate.models.diffusion.architectures import save_random_lora
    folder = tmp_path_factory.mktemp('loras')
    return {name: save_random_lora(str(folder / f'{name}.safetensors'), tiny_sd, seed=seed)
            for name, seed in (('a', 1), ('b', 2))}


@pytest.fixture(scope='session')
def gate_kwargs(tiny_sd, tiny_controlnet, tiny_loras) -> dict:
    """The paper's three variants on the tiny model."""
    return dict(sd_model=tiny_sd, prompt='a photo of a street',
                controlnets=dict(canny=dict(model=tiny_controlnet, condition=dict(type='canny'))),
                loras=tiny_loras,
                variants=[dict(), dict(controlnets=dict(canny=1.0), lora='a'),
                          dict(controlnets=dict(canny=1.0), lora='b')])
