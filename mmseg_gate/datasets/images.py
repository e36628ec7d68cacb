"""Reading images: one list of suffixes and one reader for every tool and protocol.

Every image comes out as 8-bit RGB, whatever its mode: greyscale and palette images are
expanded; 16-bit images (PIL mode ``I;16``/``I``, where ``convert('RGB')`` would clip every
value above 255 to white) are scaled to 8 bits; images with transparency are composited onto
white (the convention of captioners and taggers). A file that is missing, truncated or not an
image is an error that names it.
"""
import hashlib
import os
import os.path as osp
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmseg.registry import TRANSFORMS

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def list_images(folder: str) -> List[str]:
    """File names of the images in ``folder`` (by suffix, any case), sorted."""
    if not osp.isdir(folder):
        raise FileNotFoundError(f"Image folder '{folder}' does not exist.")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'.")
    return names


def read_image(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (see the module docstring for the modes)."""
    def decode(image: Image.Image) -> Image.Image:
        image.load()  # decode now: a truncated file fails here, not later
        return _as_rgb(image)
    return _open(path, decode)


def image_size(path: str) -> Tuple[int, int]:
    """(W, H) of the image at ``path`` from its header, without decoding it."""
    return _open(path, lambda image: image.size)


def _open(path: str, use):
    if not osp.isfile(path):
        raise FileNotFoundError(f"Image '{path}' does not exist.")
    try:
        with Image.open(path) as image:
            return use(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Image '{path}' cannot be read ({type(err).__name__}: {err}). It is "
                         'truncated, empty or not an image file: replace it, or remove it '
                         'from the folder.') from err


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode == 'F':
        raise ValueError('a 32-bit float image has no defined range; save it as an 8- or '
                         '16-bit image')
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), 'L')
    if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or 'transparency' in image.info:
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')


def to_model_range(image) -> torch.Tensor:
    """8-bit RGB (a PIL image, or pixel values 0-255 as a tensor) -> float in [-1, 1], the
    range the diffusion models take; a PIL image becomes (3, H, W)."""
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return image.float() / 127.5 - 1


def normalized_to_model_range(x: torch.Tensor, mean: torch.Tensor,
                              std: torch.Tensor) -> torch.Tensor:
    """A data preprocessor's output (``(pixels - mean) / std``) -> [-1, 1]."""
    return to_model_range(x.float() * std + mean)


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> pixel values 0-255 (float; clamp and round for 8 bits)."""
    return (x.float() + 1) * 127.5


def pixel_key(image: torch.Tensor) -> str:
    """A hash of an image's 8-bit pixels and shape; ``image`` is (3, H, W) in [-1, 1] (a data
    preprocessor's rounding error vanishes in the rounding to 8 bits): what finds an image in
    a feature store and seeds its noise."""
    pixels = from_model_range(image.detach().cpu()).round().clamp(0, 255).to(torch.uint8)
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_square(path: str, size: int, crop: bool = True) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(3, size, size) in [-1, 1] and the original (W, H): the shorter side resized to
    ``size`` and centre cropped (``crop=True``), or the whole image resized to a square."""
    image = read_image(path)
    original = image.size
    if crop:
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)),
                              max(size, round(image.height * scale))), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), Image.BICUBIC)
    return to_model_range(image), original


def read_longest(path: str, size: int, multiple: int = 1
                 ) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(3, H', W') in [-1, 1] and the original (W, H): the image resized (bicubic) so that
    its longer side is ``size``, the aspect ratio kept, each side rounded to a multiple of
    ``multiple`` (DIFT's and DiTF's SPair resize: 640, multiples of 16)."""
    image = read_image(path)
    original = image.size
    scale = size / max(image.size)
    width, height = (max(multiple, round(side * scale / multiple) * multiple)
                     for side in image.size)
    return to_model_range(image.resize((width, height), Image.BICUBIC)), original


@TRANSFORMS.register_module()
class LoadAnyImage:
    """MMCV's ``LoadImageFromFile`` (BGR uint8 ``img``, ``img_shape``, ``ori_shape``) on
    :func:`read_image`: 16-bit, palette, greyscale and transparent images come out right, and
    a broken file is an error that names it.

    Args:
        to_float32 (bool): return a float32 array. Default: False.
    """

    def __init__(self, to_float32: bool = False):
        self.to_float32 = to_float32

    def __call__(self, results: dict) -> dict:
        img = np.ascontiguousarray(np.asarray(read_image(results['img_path']))[..., ::-1])
        if self.to_float32:
            img = img.astype(np.float32)
        results['img'] = img
        results['img_shape'] = results['ori_shape'] = img.shape[:2]
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(to_float32={self.to_float32})'
