"""ADM (guided-diffusion) mapping against guided-diffusion's own forward -- work in progress:
needs `guided-diffusion-sdk` (not yet in the lock; install it with --no-deps)."""
import pytest
import torch

unet_module = pytest.importorskip('guided_diffusion.unet')


def test_mapping_equals_guided_diffusions_forward_and_taps():
    from diffusers import UNet2DModel

    from mmseg_gate.sources.adm import convert_state_dict, diffusers_config
    torch.manual_seed(0)
    args = dict(image_size=32, model_channels=32, num_res_blocks=2, channel_mult=(1, 1, 2, 2),
                attention_resolutions=(8, 4), num_head_channels=8, learn_sigma=True)
    ref = unet_module.UNetModel(
        image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
        attention_resolutions=[32 // r for r in args['attention_resolutions']], dropout=0.0,
        channel_mult=(1, 1, 2, 2), num_head_channels=8, resblock_updown=True,
        use_scale_shift_norm=True).eval()
    with torch.no_grad():  # guided-diffusion zero-initialises its output layers
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    levels = [32 // 2**level in args['attention_resolutions'] for level in range(4)]
    unet = UNet2DModel(**diffusers_config(**args)).eval()
    unet.load_state_dict(convert_state_dict(ref.state_dict(), 2, (1, 1, 2, 2), levels, 8))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([50, 250])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, ref(x, t), rtol=1e-4, atol=1e-4)
