from .frozen import FrozenStableDiffusion
from .loading import DEFAULT_MODEL, StableDiffusionParts, load_stable_diffusion
from .prompts import encode_prompt
from .unet_taps import UNetTaps

__all__ = ['FrozenStableDiffusion', 'DEFAULT_MODEL', 'StableDiffusionParts',
           'load_stable_diffusion', 'encode_prompt', 'UNetTaps']
