from ..common.taps import UNetTaps
from .loading import DEFAULT_MODEL, StableDiffusionParts, load_stable_diffusion
from .prompts import PromptEmbedding, encode_prompt
from .source import ATTENTION_MAPS, DEFAULT_TAPS, GATEFeatureExtractor, StableDiffusionSource

__all__ = ['StableDiffusionSource', 'GATEFeatureExtractor', 'ATTENTION_MAPS', 'DEFAULT_TAPS',
           'DEFAULT_MODEL', 'StableDiffusionParts', 'load_stable_diffusion', 'PromptEmbedding',
           'encode_prompt', 'UNetTaps']
