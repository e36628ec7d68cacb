"""ControlNet conditions computed by ``controlnet_aux`` detectors from the UNet's own pixels.

The condition is computed inside the backbone from exactly the pixels the VAE encodes (after
the data pipeline's augmentation and the backbone's padding), at their own resolution:
``controlnet_aux`` resizes to 512 by default, which would misalign it with the latent.
"""
import os.path as osp
from typing import Dict, Optional

import numpy as np
import torch

from ...datasets.images import from_model_range

# Detectors that need annotator weights, by name -> controlnet_aux class name.
_WEIGHTED = {
    'hed': 'HEDdetector',
    'pidi': 'PidiNetDetector',
    'midas': 'MidasDetector',
    'lineart': 'LineartDetector',
    'mlsd': 'MLSDdetector',
    'normalbae': 'NormalBaeDetector',
    'zoe': 'ZoeDetector',
}
_ANNOTATORS_HINT = ('Download the annotator weights once (online), e.g. `hf download '
                    'lllyasviel/Annotators --local-dir checkpoints/annotators`, and set '
                    "`weights='checkpoints/annotators'` in the condition config.")


class ConditionDetector:
    """Turns images in [-1, 1] (N, 3, H, W) into ControlNet conditions in [0, 1].

    Args:
        type: 'canny' or one of the weighted detectors ('hed', 'pidi', 'midas', 'lineart',
            'mlsd', 'normalbae', 'zoe').
        weights: local folder with the detector's annotator weights (not for canny).
        **kwargs: passed to the detector call, e.g. ``low_threshold=100,
            high_threshold=200`` for canny (the paper's thresholds, the defaults).
    """

    def __init__(self, type: str = 'canny', weights: Optional[str] = None, **kwargs):
        self.type = type
        self.kwargs = kwargs
        if type == 'canny':
            from controlnet_aux import CannyDetector
            self.detector = CannyDetector()
            self.kwargs = dict(dict(low_threshold=100, high_threshold=200), **kwargs)
        elif type in _WEIGHTED:
            if weights is None or not osp.isdir(weights):
                raise FileNotFoundError(
                    f"Condition detector '{type}' needs its weights in a local "
                    f'folder (weights={weights!r} is not one). {_ANNOTATORS_HINT}')
            import controlnet_aux
            self.detector = getattr(controlnet_aux, _WEIGHTED[type]).from_pretrained(weights)
        else:
            raise KeyError(f"Unknown condition detector '{type}'; use 'canny' "
                           f'or one of {sorted(_WEIGHTED)}.')

    def __repr__(self) -> str:
        return f'ConditionDetector({self.type!r}, {self.kwargs})'

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        images = from_model_range(pixels.clamp(-1, 1)).round().to(torch.uint8)
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        height, width = images.shape[1:3]
        maps = [self._detect(np.ascontiguousarray(image), height, width) for image in images]
        cond = torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2)
        return (cond.float() / 255.0).to(pixels.device)

    def _detect(self, image: np.ndarray, height: int, width: int) -> np.ndarray:
        resolution = min(height, width)  # sides are multiples of 64: no resize happens
        out = self.detector(image, detect_resolution=resolution, image_resolution=resolution,
                            output_type='np', **self.kwargs)
        out = np.asarray(out)
        if out.ndim == 2:
            out = np.repeat(out[..., None], 3, axis=2)
        if out.shape[:2] != (height, width):
            import cv2
            out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
        return out


def build_detectors(controlnets: Dict[str, dict]) -> Dict[str, ConditionDetector]:
    """The condition detector of each ControlNet config (``name -> dict(model=...,
    condition=...)``): the one place a ControlNet without a ``condition`` gets Canny (the
    paper's condition, :class:`ConditionDetector`'s default)."""
    return {name: ConditionDetector(**cfg.get('condition', {}))
            for name, cfg in controlnets.items()}
