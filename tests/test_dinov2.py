"""The DINOv2 source against transformers' own forward, read with a hook."""
import pytest
import torch

from mmseg_gate.sources import build_source


def test_maps_equal_a_hooked_forward(tiny_dinov2):
    from transformers import Dinov2Model
    source = build_source(dict(type='DINOv2Source', model=tiny_dinov2,
                               taps=('hidden_states.2', 'last_hidden_state')))
    assert [f['reduction'] for f in source.feature_info] == [16, 16]
    assert len(source.network.encoder.layer) == 3  # last_hidden_state needs every block
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = source(images)[0]
    # Independently: the image resized to 56 x 70 (x 0.875), normalised by hand, and the
    # second block's output caught by a forward hook on a model loaded on its own.
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    kept = {}
    model.encoder.layer[1].register_forward_hook(
        lambda _m, _i, out: kept.__setitem__('block', out[0] if isinstance(out, tuple)
                                             else out))
    resized = torch.nn.functional.interpolate(images, size=(56, 70), mode='bilinear',
                                              align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        last = model(pixel_values=((resized + 1) / 2 - mean) / std).last_hidden_state
    for name, tokens in (('hidden_states.2', kept['block']), ('last_hidden_state', last)):
        expected = tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 5)
        assert ours[name].shape == (2, 32, 4, 5)
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-5)


def test_unused_blocks_are_freed_and_bad_input_named(tiny_dinov2, tmp_path):
    source = build_source(dict(type='DINOv2Source', model=tiny_dinov2,
                               taps=('hidden_states.1', )))
    assert len(source.network.encoder.layer) == 1
    with pytest.raises(ValueError, match="hidden_states.<i>' with i in 0..3"):
        build_source(dict(type='DINOv2Source', model=tiny_dinov2, taps=('cls', )))
    with pytest.raises(ValueError, match='keeps it whole'):
        build_source(dict(type='DINOv2Source', model=tiny_dinov2, input_scale=0.9))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        build_source(dict(type='DINOv2Source', model=str(tmp_path / 'empty')))
    # A file that lacks tensors is refused, not completed with random weights.
    from safetensors.torch import load_file, save_file
    import shutil
    partial = tmp_path / 'partial'
    shutil.copytree(tiny_dinov2, partial)
    weights = load_file(partial / 'model.safetensors')
    weights.pop(next(k for k in weights if 'layer.2' in k))
    save_file(weights, partial / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='do not fit Dinov2Model'):
        build_source(dict(type='DINOv2Source', model=str(partial)))


def test_damaged_weights_are_named(tiny_dinov2, tmp_path):
    """NaN weights, a truncated file, a pickle named model.safetensors and weights of
    another shape: each an error of ours naming the folder."""
    import shutil
    from safetensors.torch import load_file, save_file

    def damaged(name, write):
        folder = tmp_path / name
        shutil.copytree(tiny_dinov2, folder)
        weights = load_file(folder / 'model.safetensors')  # mapped: copied before rewriting
        write(folder / 'model.safetensors', {k: v.clone() for k, v in weights.items()})
        return str(folder)

    def with_nan(path, weights):
        key = next(k for k in weights if k.endswith('layer.0.attention.attention.query.weight'))
        weights[key][0, 0] = float('nan')
        save_file(weights, path, metadata={'format': 'pt'})

    def truncated(path, weights):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    def pickled(path, weights):
        torch.save(weights, path)

    def other_shape(path, weights):
        key = next(k for k in weights if k.endswith('layer.0.attention.attention.query.weight'))
        weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
        save_file(weights, path, metadata={'format': 'pt'})

    folder = damaged('nan', with_nan)
    with pytest.raises(ValueError, match=rf"(?s){folder}.*non-finite"):
        build_source(dict(type='DINOv2Source', model=folder))
    for name, write in (('truncated', truncated), ('pickled', pickled),
                        ('other_shape', other_shape)):
        folder = damaged(name, write)
        with pytest.raises(ValueError, match=rf"(?s)Cannot load DINOv2 from '{folder}'.*"
                                             'hf download'):
            build_source(dict(type='DINOv2Source', model=folder))
