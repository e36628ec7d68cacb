"""Loading ControlNets and checking that they fit the UNet they steer."""
import os
import os.path as osp

from diffusers import ControlNetModel

from ..common.loading import is_local_path, load_weights

DEFAULT_CANNY = 'lllyasviel/sd-controlnet-canny'
_GET_CONTROLNET_HINT = (
    f"Get the paper's Canny ControlNet with `hf download {DEFAULT_CANNY} --local-dir "
    'checkpoints/controlnet-canny --include "*.json" "*.safetensors"`.')


def load_controlnet(model: str, unet) -> ControlNetModel:
    """A frozen diffusers ControlNet from a local folder or hub id, checked against ``unet``."""
    if is_local_path(model):
        if not osp.isdir(model):
            raise FileNotFoundError(
                f"ControlNet folder '{model}' does not exist. "
                f'{_GET_CONTROLNET_HINT}')
        if not any(f.endswith('.safetensors') for f in os.listdir(model)):
            raise ValueError(f"'{model}' has no .safetensors ControlNet weights; "
                             'GATE loads safetensors only (convert with `ControlNetModel.'
                             'from_pretrained(folder).save_pretrained(folder)`).')
    controlnet = load_weights(ControlNetModel, model, hint=_GET_CONTROLNET_HINT)
    check_controlnet_fits(controlnet, unet, model)
    return controlnet.requires_grad_(False).eval()


def check_controlnet_fits(controlnet, unet, name: str) -> None:
    """A ControlNet made for another UNet family (e.g. SDXL's for SD1.5) cannot add its
    residuals: say so instead of failing deep inside the forward."""
    ours, theirs = unet.config, controlnet.config
    for key in ('cross_attention_dim', 'block_out_channels', 'layers_per_block'):
        if tuple(_as_tuple(getattr(ours, key))) != tuple(_as_tuple(getattr(theirs, key))):
            raise ValueError(
                f"ControlNet '{name}' does not fit the UNet: its {key} is "
                f'{getattr(theirs, key)} but the UNet has {getattr(ours, key)}. Use a '
                'ControlNet trained for the same Stable Diffusion version.')


def _as_tuple(value):
    return value if isinstance(value, (list, tuple)) else (value, )
