"""Weights load completely or fail, naming the file: SD parts, ControlNets and LoRAs."""
import shutil
import os.path as osp

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mmseg_gate import GATEBackbone
from mmseg_gate.sources.common.lora import load_lora_adapters, save_lora_file

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
UNET_FILE = osp.join('unet', 'diffusion_pytorch_model.safetensors')


def paper_targets():
    from mmengine.config import Config
    return list(Config.fromfile(osp.join(ROOT, 'configs', 'lora', '_base_.py')).target_modules)


@pytest.fixture
def sd_copy(tiny_sd, tmp_path):
    return shutil.copytree(tiny_sd, tmp_path / 'sd')


def edit_safetensors(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_nan_in_unet_weights(sd_copy):
    edit_safetensors(sd_copy / UNET_FILE,
                     lambda t: t[next(k for k in t if k.endswith('weight'))].fill_(float('nan')))
    with pytest.raises(ValueError, match=r"(?s)sd/unet'.*non-finite"):
        GATEBackbone(source=dict(model=str(sd_copy)))


def test_truncated_unet_weights(sd_copy):
    path = sd_copy / UNET_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"(?s)Cannot load '.*sd/unet'.*truncated"):
        GATEBackbone(source=dict(model=str(sd_copy)))


def test_unet_file_missing_a_tensor(sd_copy):
    edit_safetensors(sd_copy / UNET_FILE, lambda t: t.pop('conv_in.weight'))
    with pytest.raises(ValueError, match=r"(?s)sd/unet'.*(missing|Cannot load)"):
        GATEBackbone(source=dict(model=str(sd_copy)))


def test_only_fp16_variant_weights(sd_copy):
    shutil.move(sd_copy / UNET_FILE, sd_copy / 'unet' / 'diffusion_pytorch_model.fp16.safetensors')
    with pytest.raises(ValueError, match=r'(?s)only variant weights.*fp16'):
        GATEBackbone(source=dict(model=str(sd_copy)))


@pytest.mark.parametrize('timestep', [50.5, '50', True])
def test_non_integer_timestep(tiny_sd, timestep):
    with pytest.raises(ValueError, match='timestep must be an integer'):
        GATEBackbone(source=dict(model=tiny_sd, timestep=timestep))


def lora_unet(tiny_sd, rank=4, alpha=2, seed=0):
    """The tiny UNet with a random LoRA on the paper's LoCon targets."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder='unet')
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                target_modules=paper_targets()))
    return unet


def fresh_unet(tiny_sd):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder='unet')


def test_saved_lora_round_trips_exactly(tiny_sd, tmp_path):
    """Every tensor (attention and convolutions) lands, with its alpha: the loaded UNet
    computes what the trained one did."""
    trained = lora_unet(tiny_sd, rank=4, alpha=2)
    path = save_lora_file(trained, str(tmp_path / 'lora.safetensors'))
    assert all('.lora_A.' in k or '.lora_B.' in k for k in load_file(path))
    unet = fresh_unet(tiny_sd)
    load_lora_adapters(unet, {'x': path}, {'x': 1.0})
    assert len(get_peft_model_state_dict(unet, adapter_name='x')) == len(load_file(path))
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(latents, 50, context).sample,
                                   trained(latents, 50, context).sample)


def test_mixed_key_styles_load_completely(tiny_sd, tmp_path):
    """diffusers' converter writes attention keys as lora.down/up and the others as
    lora_A/B; diffusers alone then drops the attention LoRA when the first key is lora_A."""
    from diffusers.utils import convert_state_dict_to_diffusers
    trained = lora_unet(tiny_sd)
    mixed = {f'unet.{k}': v for k, v in convert_state_dict_to_diffusers(
        get_peft_model_state_dict(trained)).items()}
    assert next(iter(mixed)).endswith('lora_A.weight') and any('.lora.down.' in k for k in mixed)
    path = str(tmp_path / 'mixed.safetensors')
    save_file(mixed, path)
    unet = fresh_unet(tiny_sd)
    load_lora_adapters(unet, {'x': path}, {'x': 1.0})
    landed = get_peft_model_state_dict(unet, adapter_name='x')
    assert len(landed) == len(mixed)
    assert any('attn1.to_q' in k for k in landed)


def test_unknown_lora_key_format_is_an_error(tiny_sd, tmp_path):
    state = load_file(save_lora_file(lora_unet(tiny_sd), str(tmp_path / 'a.safetensors')))
    odd = {k.replace('.lora_A.', '.lora_linear_layer.down.')
           .replace('.lora_B.', '.lora_linear_layer.up.'): v for k, v in state.items()}
    path = str(tmp_path / 'odd.safetensors')
    save_file(odd, path)
    with pytest.raises(ValueError, match=r'(?s)odd.safetensors.*format GATE does not know'):
        load_lora_adapters(fresh_unet(tiny_sd), {'x': path}, {'x': 1.0})


def test_tensors_that_do_not_land_are_counted(tiny_sd, lora_file, monkeypatch):
    """Whatever diffusers/peft drop on the way (they only warn) is caught by the count."""
    unet = fresh_unet(tiny_sd)
    load = unet.load_lora_adapter

    def lossy_load(state_dict, **kwargs):
        return load({k: v for k, v in state_dict.items() if 'attn1' not in k}, **kwargs)

    monkeypatch.setattr(unet, 'load_lora_adapter', lossy_load)
    with pytest.raises(ValueError, match=r'(?s)lora.safetensors.*only \d+ of its \d+ unet tensors'):
        load_lora_adapters(unet, {'x': lora_file}, {'x': 1.0})


@pytest.fixture
def lora_file(tiny_sd, tmp_path):
    return save_lora_file(lora_unet(tiny_sd), str(tmp_path / 'lora.safetensors'))


def break_nan(path):
    edit_safetensors(path, lambda t: t[next(iter(t))].fill_(float('nan')))


def break_truncate(path):
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def break_empty(path):
    open(path, 'wb').close()


def break_rank(path):
    def edit(tensors):
        key = next(k for k in tensors if k.endswith('lora_A.weight'))
        tensors[key] = tensors[key][:2].contiguous()  # rank 2 against lora_B's 4
    edit_safetensors(path, edit)


@pytest.mark.parametrize('breaker, message', [
    (break_nan, 'non-finite'), (break_truncate, 'cannot be read'),
    (break_empty, 'cannot be read'), (break_rank, 'inconsistent')],
    ids=['nan', 'truncated', 'empty', 'rank'])
def test_broken_lora_file_is_named(tiny_sd, lora_file, breaker, message):
    breaker(lora_file)
    with pytest.raises(ValueError, match=f'(?s)lora.safetensors.*{message}'):
        load_lora_adapters(fresh_unet(tiny_sd), {'x': lora_file}, {'x': 1.0})


def test_nan_controlnet_is_named(gate_kwargs, tiny_controlnet, tmp_path):
    broken = shutil.copytree(tiny_controlnet, tmp_path / 'cn')
    edit_safetensors(broken / 'diffusion_pytorch_model.safetensors',
                     lambda t: t[next(iter(t))].fill_(float('inf')))
    controlnets = dict(canny=dict(model=str(broken), condition=dict(type='canny')))
    with pytest.raises(ValueError, match=r"(?s)cn'.*non-finite"):
        GATEBackbone(source=dict(gate_kwargs, controlnets=controlnets))


@pytest.mark.parametrize('option', ['steps=0', 'num_images=0', 'batch_size=-1'])
def test_train_lora_rejects_empty_settings(option, tmp_path, run_tool_here):
    result = run_tool_here('train_lora', osp.join(ROOT, 'configs', 'lora', 'demo.py'),
                           '--cfg-options', option, f'work_dir={tmp_path}')
    assert result.returncode != 0
    assert f"{option.split('=')[0]} must be a positive integer" in result.stderr
