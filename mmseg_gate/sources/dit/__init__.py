"""Diffusion-transformer sources, one file per model family: ``base.py`` (what both share,
and ``DiTSource``, which builds the family of the folder's pipeline), ``sd3.py``
(``SD3Source``) and ``flux.py`` (``FluxSource``)."""
from .base import (FAMILY_CLASSES, GET_DIT_HINT, DiTSource, block_names, dtype_kwargs,
                   load_dit_controlnet, load_dit_lora, load_scheduler, load_text_parts,
                   model_classes, read_kind, truncated_build)
from .flux import FluxSource, image_ids, pack_latents
from .sd3 import SD3Source

# The pipeline each kind reads, and the parts its features load.
KINDS = {cls.pipeline_class.__name__: kind for kind, cls in FAMILY_CLASSES.items()}
PARTS = {kind: cls.parts for kind, cls in FAMILY_CLASSES.items()}

__all__ = ['DiTSource', 'SD3Source', 'FluxSource', 'GET_DIT_HINT', 'KINDS', 'PARTS',
           'read_kind', 'load_scheduler', 'model_classes', 'block_names', 'truncated_build',
           'load_text_parts', 'dtype_kwargs', 'load_dit_lora', 'load_dit_controlnet',
           'pack_latents', 'image_ids']
