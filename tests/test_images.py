"""One image reader for every tool: any mode comes out as the 8-bit RGB it shows, and a
broken file is an error that names it."""
import numpy as np
import pytest
from PIL import Image

from mmseg_gate.datasets.images import (IMAGE_SUFFIXES, LoadAnyImage, image_size, list_images,
                                        read_image, read_square)


def gradient(height=8, width=16) -> np.ndarray:
    return np.tile(np.linspace(0, 1, width), (height, 1))


def test_sixteen_bit_greyscale_is_scaled_not_white(tmp_path):
    values = np.round(gradient() * 65535).astype(np.uint16)
    path = str(tmp_path / 'depth16.png')
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith('I')  # what convert('RGB') turns white
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (8, 16, 3) and rgb.dtype == np.uint8
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb.min() == 0 and rgb.max() == 255


def test_greyscale_palette_and_transparency(tmp_path):
    grey = (gradient() * 255).astype(np.uint8)
    Image.fromarray(grey, 'L').save(tmp_path / 'grey.png')
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'grey.png')))[..., 1], grey)

    colours = np.zeros((8, 16, 3), np.uint8)
    colours[:, 8:] = (200, 30, 60)
    Image.fromarray(colours).convert('P', palette=Image.ADAPTIVE, colors=4).save(
        tmp_path / 'palette.png')
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'palette.png'))), colours)

    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :8, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    out = np.asarray(read_image(str(tmp_path / 'rgba.png')))
    assert (out[:, :8] == (10, 20, 30)).all() and (out[:, 8:] == 255).all()


def test_broken_files_are_named(tmp_path):
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    with pytest.raises(ValueError, match=r"notes\.jpg.*not an image"):
        read_image(str(text))
    with pytest.raises(ValueError, match=r"notes\.jpg"):
        image_size(str(text))
    Image.fromarray((gradient(64, 64) * 255).astype(np.uint8)).save(tmp_path / 'whole.png')
    data = (tmp_path / 'whole.png').read_bytes()
    (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png.*truncated"):
        read_image(str(tmp_path / 'cut.png'))
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        read_image(str(tmp_path / 'gone.png'))


def test_listing_and_square_reads(tmp_path):
    for name in ('b.PNG', 'a.jpg', 'c.webp', 'd.bmp', 'notes.txt'):
        if name.endswith('.txt'):
            (tmp_path / name).write_text('x')
        else:
            Image.new('RGB', (40, 20), (255, 0, 0)).save(tmp_path / name)
    assert list_images(str(tmp_path)) == ['a.jpg', 'b.PNG', 'c.webp', 'd.bmp']
    assert {'.webp', '.bmp', '.png', '.jpg'} <= set(IMAGE_SUFFIXES)
    tensor, original = read_square(str(tmp_path / 'b.PNG'), 16)
    assert tensor.shape == (3, 16, 16) and original == (40, 20)
    assert tensor[0].min() == 1 and tensor[1].max() == -1  # red in [-1, 1]
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='No images'):
        list_images(str(tmp_path / 'empty'))


def test_mmseg_transform_matches_mmcv_for_plain_images(tmp_path):
    from mmcv.transforms import LoadImageFromFile
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(tmp_path / 'x.png')
    ours = LoadAnyImage()(dict(img_path=str(tmp_path / 'x.png')))
    theirs = LoadImageFromFile()(dict(img_path=str(tmp_path / 'x.png')))
    assert np.array_equal(ours['img'], theirs['img'])  # BGR, uint8
    assert ours['img_shape'] == theirs['img_shape'] == ours['ori_shape'] == (12, 20)
