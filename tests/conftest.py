"""Shared tiny models: built once per session, saved in diffusers format, loaded for real."""
import copy
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import mmseg_gate  # noqa: F401
from mmseg.utils import register_all_modules
from mmseg_gate.testing.demo_data import write_ade_layout_dataset
from mmseg_gate.testing.architectures import save_random_stable_diffusion

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

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
    return GATEBackbone(source=dict(model=tiny_sd, prompt='a photo of a street'))


@pytest.fixture
def backbone(_backbone):
    """A fresh copy per test (trainable parts copied, frozen parts shared), in eval mode."""
    return copy.deepcopy(_backbone).eval()


@pytest.fixture(scope='session')
def tiny_controlnet(tiny_sd, tmp_path_factory) -> str:
    """A ControlNet for the tiny UNet whose zero convolutions are not zero (it does something)."""
    from mmseg_gate.testing.architectures import save_random_controlnet
    return save_random_controlnet(str(tmp_path_factory.mktemp('controlnet')), tiny_sd)


@pytest.fixture(scope='session')
def tiny_loras(tiny_sd, tmp_path_factory) -> dict:
    from mmseg_gate.testing.architectures import save_random_lora
    folder = tmp_path_factory.mktemp('loras')
    return {name: save_random_lora(str(folder / f'{name}.safetensors'), tiny_sd, seed=seed)
            for name, seed in (('a', 1), ('b', 2))}


@pytest.fixture(scope='session')
def gate_kwargs(tiny_sd, tiny_controlnet, tiny_loras) -> dict:
    """The paper's three variants on the tiny model."""
    return dict(model=tiny_sd, prompt='a photo of a street',
                controlnets=dict(canny=dict(model=tiny_controlnet, condition=dict(type='canny'))),
                loras=tiny_loras,
                variants=[dict(), dict(controlnets=dict(canny=1.0), lora='a'),
                          dict(controlnets=dict(canny=1.0), lora='b')])


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory) -> str:
    """A small demo dataset in ADE20K's layout (8 training, 2 validation images)."""
    root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
    write_ade_layout_dataset(root, num_train=8, num_val=2, seed=0)
    return root


@pytest.fixture(scope='session')
def tiny_adm(tmp_path_factory) -> str:
    """A tiny random ADM checkpoint in guided-diffusion's layout (TINY_ADM)."""
    from mmseg_gate.testing.architectures import save_random_adm
    return save_random_adm(str(tmp_path_factory.mktemp('adm') / 'adm.pt'))


@pytest.fixture(scope='session')
def tiny_dinov2(tmp_path_factory) -> str:
    """A tiny random DINOv2 in transformers' format (TINY_DINOV2)."""
    from mmseg_gate.testing.architectures import save_random_dinov2
    return save_random_dinov2(str(tmp_path_factory.mktemp('dinov2') / 'dinov2'))


@pytest.fixture(scope='session')
def tiny(tiny_sd, tiny_controlnet, tiny_loras, tiny_adm, tiny_dinov2) -> dict:
    return dict(sd_model=tiny_sd, controlnet=tiny_controlnet, loras=tiny_loras, adm=tiny_adm,
                dinov2=tiny_dinov2)


@pytest.fixture(scope='session')
def scarce_demo_options(tiny) -> list:
    """``--cfg-options`` pointing the label-scarce demo config at the tiny models."""
    sources = 'model.backbone.source.sources'
    return [f"{sources}.sd.model={tiny['sd_model']}",
            f"{sources}.sd.controlnets.canny.model={tiny['controlnet']}",
            f"{sources}.sd.loras.a={tiny['loras']['a']}",
            f"{sources}.adm.model={tiny['adm']}"]


@pytest.fixture(scope='session')
def make_demo_cfg(tiny, demo_root):
    """``make_demo_cfg(work_dir, max_iters)``: the demo config (three GATE variants) on the
    tiny models and data, checkpointing and validating every 2 iterations."""

    def make(work_dir, max_iters: int) -> Config:
        cfg = Config.fromfile(osp.join(ROOT, 'configs', 'gate_upernet_demo.py'))
        cfg.model.backbone.source.model = tiny['sd_model']
        cfg.model.backbone.source.controlnets.canny.model = tiny['controlnet']
        cfg.model.backbone.source.loras = dict(tiny['loras'])
        cfg.work_dir = str(work_dir)
        for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
            loader.dataset.data_root = demo_root
        cfg.train_dataloader.batch_size = 2
        cfg.train_cfg.max_iters = max_iters
        cfg.train_cfg.val_interval = max_iters
        cfg.default_hooks.checkpoint.interval = 2
        cfg.default_hooks.logger.interval = 1
        cfg.param_scheduler[0].end = max_iters
        return cfg

    return make


@pytest.fixture(scope='session')
def tiny_sd21(tmp_path_factory) -> str:
    """SD2.x's layout: OpenCLIP-style encoder, linear projections, v-prediction."""
    return save_random_stable_diffusion(str(tmp_path_factory.mktemp('tiny-sd21')), 'tiny-sd21')


@pytest.fixture(scope='session')
def tiny_sdxl(tmp_path_factory) -> str:
    """SDXL's layout: two text encoders, added text/time embedding, three levels."""
    return save_random_stable_diffusion(str(tmp_path_factory.mktemp('tiny-sdxl')), 'tiny-sdxl')


@pytest.fixture(scope='session')
def sdxl_guidance(tiny_sdxl, tmp_path_factory) -> dict:
    """A ControlNet and a LoRA (the LoRA recipe's targets) for the tiny SDXL."""
    from mmseg_gate.testing.architectures import save_random_controlnet, save_random_lora
    folder = tmp_path_factory.mktemp('sdxl-guidance')
    return dict(controlnet=save_random_controlnet(str(folder / 'cn'), tiny_sdxl),
                lora=save_random_lora(str(folder / 'lora.safetensors'), tiny_sdxl,
                                      targets=lora_recipe_targets()))


def lora_recipe_targets() -> list:
    """The LoRA recipe's target modules (configs/lora/_base_.py: LoCon, 12 module types)."""
    return list(Config.fromfile(osp.join(ROOT, 'configs', 'lora', '_base_.py')).target_modules)


@pytest.fixture
def run_tool_here(monkeypatch, capsys):
    """``run_tool_here(name, *args)``: ``tools/<name>.py`` run as ``python tools/<name>.py
    ARGS`` would run it, but in this process (its imports already loaded: a tool's own
    process spends most of a quick run importing); a ``CompletedProcess`` with its exit
    status, stdout and stderr."""
    import runpy
    import subprocess
    import sys

    def run(name, *args):
        path = osp.join(ROOT, 'tools', f'{name}.py')
        argv = [path, *map(str, args)]
        monkeypatch.setattr(sys, 'argv', argv)
        monkeypatch.chdir(ROOT)
        environment, code = dict(os.environ), 0
        try:
            runpy.run_path(path, run_name='__main__')
        except SystemExit as exit:  # as the interpreter turns it into a status
            code = exit.code if isinstance(exit.code, int) or exit.code is None else 1
            if not isinstance(exit.code, (int, type(None))):
                print(exit.code, file=sys.stderr)
        finally:  # what the tool set (e.g. LOCAL_RANK) goes with it
            os.environ.clear()
            os.environ.update(environment)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code or 0, out.out, out.err)

    return run
