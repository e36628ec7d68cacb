"""Feature sources: the contract, several sources side by side, and everything downstream
taking any source."""
import pytest
import torch

from mmseg_gate import CompositeSource, GATEBackbone, StableDiffusionSource, build_source
from mmseg_gate.analysis.content_shift import measure_content_shift
from mmseg_gate.protocols.correspondence import raw_features
from mmseg_gate.sources.base import SOURCES, FeatureSource


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1,
                                           size=(64, 64), mode='nearest')


@pytest.fixture(scope='module')
def parts(tiny_sd, tiny_sd21):
    """Two sources of different models: SD1.x with two variants, SD2.x with one."""
    sd = dict(type='StableDiffusionSource', model=tiny_sd, prompt='a photo',
              variants=[dict(), dict(prompt='a photo of a street')])
    sd21 = dict(type='StableDiffusionSource', model=tiny_sd21, prompt='a photo')
    return dict(sd=sd, sd21=sd21)


def test_kept_apart(parts):
    composite = build_source(dict(type='CompositeSource', sources=parts))
    assert isinstance(composite, CompositeSource) and composite.num_variants == 3
    info = composite.feature_info
    assert [f['module'] for f in info][:1] == ['sd.up_blocks.0.upsamplers.0']
    assert [f['num_variants'] for f in info] == [2, 2, 2, 1, 1, 1]
    x = images()
    feats = composite(x)  # no generator: each source draws its own default noise
    alone = {name: build_source(cfg)(x) for name, cfg in parts.items()}
    expected = [{f'sd.{k}': v for k, v in d.items()} for d in alone['sd']] + \
        [{f'sd21.{k}': v for k, v in d.items()} for d in alone['sd21']]
    assert [sorted(d) for d in feats] == [sorted(d) for d in expected]
    for ours, theirs in zip(feats, expected):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name])
    assert composite.variant_names[-1] == 'sd21: prompt'


def test_concatenated_and_pooled(tiny_sd, tiny_sd21):
    one = dict(type='StableDiffusionSource', model=tiny_sd, prompt='a photo')
    two = dict(type='StableDiffusionSource', model=tiny_sd21, prompt='a photo')
    x = images()
    a, b = build_source(one)(x)[0], build_source(two)(x)[0]
    concat = CompositeSource(dict(a=one, b=two), mode='concat')
    assert [f['num_chs'] for f in concat.feature_info] == [128, 128, 128]
    name = concat.feature_info[0]['module']
    assert name == 'up_blocks.0.upsamplers.0+up_blocks.0.upsamplers.0'
    out = concat(x)
    assert len(out) == 1
    first = 'up_blocks.0.upsamplers.0'
    torch.testing.assert_close(out[0][name], torch.cat([a[first], b[first]], dim=1))
    pooled = CompositeSource(dict(a=one, b=two), mode='variants')
    assert [f['num_variants'] for f in pooled.feature_info] == [2, 2, 2]
    out = pooled(x)
    assert len(out) == 2
    torch.testing.assert_close(out[1][name], b[first])
    with pytest.raises(ValueError, match='mode'):
        CompositeSource(dict(a=one), mode='stacked')


def test_concat_needs_matching_variants(parts):
    with pytest.raises(ValueError, match="'sd21' has 1 variants"):
        CompositeSource(parts, mode='concat')


def test_the_backbone_and_the_tools_take_any_source(parts):
    backbone = GATEBackbone(source=dict(type='CompositeSource', sources=parts)).eval()
    assert len(backbone.out_channels) == 6 and backbone.out_strides == [8, 8, 16, 16, 32, 32]
    outs = backbone(images())
    assert len(outs) == 6 and all(torch.isfinite(o).all() for o in outs)
    composite = backbone.source
    result = measure_content_shift(composite, images(), [50], anchor_timestep=400,
                                   progress=False)
    # The reference variant (sd's first) holds sd's features: those are measured, for sd's
    # two variants.
    assert sorted(result['summary']) == sorted(f['module'] for f in composite.feature_info
                                               if f['module'].startswith('sd.'))
    assert set(next(iter(result['summary'].values()))[50]) == {0, 1}
    raw = raw_features(composite(images()))
    assert raw.shape[:2] == (1, 2 * 3 * 64)  # each source's normalised taps, side by side


def test_old_backbone_arguments_name_the_new_form(tiny_sd):
    with pytest.raises(TypeError, match=r"(?s)\['prompt', 'sd_model'\].*source=dict"):
        GATEBackbone(sd_model=tiny_sd, prompt='a photo')
    assert isinstance(GATEBackbone(source=dict(model=tiny_sd)).source,
                      StableDiffusionSource)


@pytest.mark.parametrize('kind, old, new', [
    ('StableDiffusionSource', dict(sd_model='x'), 'model'),
    ('ADMSource', dict(checkpoint='x.pt'), 'model'),
    ('ADMSource', dict(model='x.pt', blocks=(5, )), 'taps'),
    ('DINOv2Source', dict(model='x', features=('last_hidden_state', )), 'taps'),
])
def test_every_source_names_the_weights_model_and_what_it_reads_taps(kind, old, new):
    """One name per concept across sources; an old name is refused before anything loads,
    naming the new one."""
    renamed = next(k for k in old if k != 'model' or len(old) == 1)
    with pytest.raises(TypeError, match=rf'{kind}: `{renamed}` is now called `{new}`'):
        build_source(dict(type=kind, **old))
    with pytest.raises(TypeError, match=r"ADMSource: `model` is the checkpoint file now.*"
                                        r"architecture=dict"):
        build_source(dict(type='ADMSource', model=dict(image_size=32)))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['promt'\]"):
        build_source(dict(type='StableDiffusionSource', promt='a typo'))


def test_input_scale_runs_the_model_at_another_resolution(parts):
    """SD1.5 at 512 on 256x256 benchmark images: the source upsamples (bilinear) and reports
    strides in input pixels."""
    plain = build_source(parts['sd'])
    doubled = build_source(dict(parts['sd'], input_scale=2.0))
    assert [f['reduction'] * 2 for f in doubled.feature_info] == \
        [f['reduction'] for f in plain.feature_info]
    small = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    large = torch.nn.functional.interpolate(small, size=(64, 96), mode='bilinear',
                                            align_corners=False)
    for ours, theirs in zip(doubled(small), plain(large)):
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value)
            assert ours[name].shape[-1] == -(-48 // doubled.feature(name)['reduction'])
    with pytest.raises(ValueError, match='keeps it whole'):
        build_source(dict(parts['sd'], input_scale=3.0))


class _Pooled(FeatureSource):
    """A source written on the template: ``_extract`` only (4x4 average pooling)."""

    feature_info = [dict(module='pool', num_chs=3, reduction=2, num_variants=1)]
    input_scale, size_multiple = 2.0, 4
    variant_names = ['pooled']

    def __init__(self):
        self.seen = []

    def to(self, device):
        return self

    def check_timestep(self, timestep):
        if timestep is not None and timestep < 0:
            raise ValueError('negative timestep')

    def _extract(self, pixels, timestep, generator):
        self.seen.append(tuple(pixels.shape))
        return [dict(pool=torch.nn.functional.avg_pool2d(pixels, 4))]


def test_every_source_runs_the_template():
    """One ``__call__`` for all: images checked, resized by ``input_scale``, padded to
    ``size_multiple`` (edge replication), ``_extract``, each feature cropped to the input."""
    for name, cls in SOURCES.module_dict.items():
        assert cls.__call__ is FeatureSource.__call__, f'{name} has a __call__ of its own'
    source = _Pooled()
    x = torch.rand(1, 3, 5, 7) * 2 - 1
    out = source(x)[0]['pool']
    assert source.seen[-1] == (1, 3, 12, 16)  # 10x14 padded to multiples of 4
    assert out.shape == (1, 3, 3, 4)  # ceil(5 / 2) x ceil(7 / 2)
    big = torch.nn.functional.interpolate(x, size=(10, 14), mode='bilinear',
                                          align_corners=False)
    big = torch.nn.functional.pad(big, (0, 2, 0, 2), mode='replicate')
    torch.testing.assert_close(out, torch.nn.functional.avg_pool2d(big, 4)[..., :3, :4])
    with pytest.raises(ValueError, match=r'\(N, 3, H, W\)'):
        source(torch.rand(3, 5, 7))
    with pytest.raises(ValueError, match='negative timestep'):
        source(x, timestep=-1)
    with pytest.raises(TypeError, match='generator='):
        source(x, torch.Generator())
