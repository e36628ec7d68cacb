"""FLUX.1's side of the DiT source: what its transformer and pipeline do their own way (the
rest is ``base.py``'s): latents packed 2x2 into tokens with position ids, double- and
single-stream blocks, a resolution-dependent scheduler shift, the guidance embedding."""
from typing import Dict, List, Tuple

import numpy as np
import torch
from diffusers import FluxControlNetModel, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..base import SOURCES
from .base import DiTSource


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's token layout: (N, C, H, W) latents as (N, H/2 * W/2, 4C) tokens, each 2x2 patch
    one token (row-major)."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's position ids of (height x width) image tokens: (0, row, column) each."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


@SOURCES.register_module()
class FluxSource(DiTSource):
    """FLUX.1 transformer features (``FluxTransformer2DModel``): double- and single-stream
    blocks, CLIP-L and T5 prompts, packed latents. Arguments as :class:`DiTSource`'s (which
    builds this class for a ``FluxPipeline`` folder)."""

    kind = 'flux'
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    controlnet_class = FluxControlNetModel
    parts = dict(transformer='model', vae='model', scheduler='scheduler', text_encoder='model',
                 text_encoder_2='model', tokenizer='clip_tokenizer', tokenizer_2='t5_tokenizer')
    residual_keys = ('controlnet_block_samples', 'controlnet_single_block_samples')

    @classmethod
    def block_names(cls, config) -> List[str]:
        """The double-stream blocks, then the single-stream ones."""
        return super().block_names(config) + [
            f'single_transformer_blocks.{i}' for i in range(config['num_single_layers'])]

    @staticmethod
    def default_tap(names: List[str], config) -> str:
        """The last double-stream block."""
        return f"transformer_blocks.{config['num_layers'] - 1}"

    @staticmethod
    def truncated_build(last: str) -> Dict[str, int]:
        """The blocks of a stream are all alike, so fewer of them is the same model cut
        short: build only those up to ``last``."""
        stream, index = last.rsplit('.', 1)
        if stream == 'transformer_blocks':
            return dict(num_layers=int(index) + 1, num_single_layers=0)
        return dict(num_single_layers=int(index) + 1)

    def prune_after_last_tap(self) -> List[str]:
        """A tap in the double-stream blocks also leaves out every single-stream block."""
        freed = super().prune_after_last_tap()
        if self.final.rsplit('.', 1)[0] == 'transformer_blocks':
            single = self.transformer.single_transformer_blocks
            freed += [f'single_transformer_blocks.{i}' for i in range(len(single))]
            self.transformer.single_transformer_blocks = torch.nn.ModuleList()
        return freed

    # CLIP-L and T5, with their tokenizers.
    text_parts = dict(text_encoder=CLIPTextModel, text_encoder_2=T5EncoderModel,
                      tokenizer=CLIPTokenizer, tokenizer_2=T5TokenizerFast)

    @staticmethod
    def prompt_embeddings(pipe, prompt: str, length: Dict) -> Dict[str, torch.Tensor]:
        """The prompt for both encoders, with its text position ids."""
        out = pipe.encode_prompt(prompt, prompt, device='cpu', **length)
        return dict(encoder_hidden_states=out[0], pooled_projections=out[1], txt_ids=out[2])

    def patch_size(self) -> int:
        """The 2x2 packing."""
        return 2

    def schedule(self, steps: int, image_seq_len: int) -> None:
        """The pipeline's sigmas with its shift ``mu`` for ``image_seq_len`` tokens."""
        sigmas = np.linspace(1.0, 1 / steps, steps)
        cfg = self.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.get('base_image_seq_len', 256),
                             cfg.get('max_image_seq_len', 4096), cfg.get('base_shift', 0.5),
                             cfg.get('max_shift', 1.15))
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu)

    def tokens(self, latents: torch.Tensor, grid: Tuple[int, int]) -> Dict:
        """The packed latents and their position ids."""
        return dict(hidden_states=pack_latents(latents),
                    img_ids=image_ids(*grid).to(self.device, self.dtype))

    def family_inputs(self, inputs: Dict, embed: Dict, n: int) -> Dict:
        """The text ids, the timestep in [0, 1] and the guidance embedding's value (models
        that have one)."""
        inputs.update(txt_ids=embed['txt_ids'].to(self.dtype),
                      timestep=inputs['timestep'] / 1000)
        if self.transformer.config.guidance_embeds:
            inputs['guidance'] = torch.full((n, ), self.guidance_scale,
                                            device=self.device, dtype=self.dtype)
        return inputs

    def control_latent(self, name: str, latent: torch.Tensor) -> torch.Tensor:
        """Shifted, scaled and packed, as the FLUX ControlNet pipeline feeds it."""
        return pack_latents((latent - (self.vae.config.shift_factor or 0.0))
                            * self.vae.config.scaling_factor)

    def controlnet_residuals(self, net, inputs: Dict, condition: torch.Tensor) -> List:
        """The double- and single-stream residuals (None where it has none)."""
        extra = {k: inputs[k] for k in ('hidden_states', 'timestep', 'img_ids', 'txt_ids',
                                        'pooled_projections', 'encoder_hidden_states')}
        if net.config.guidance_embeds:
            extra['guidance'] = torch.full_like(inputs['timestep'], self.guidance_scale)
        return [None if r is None else list(r) for r in net(
            controlnet_cond=condition, conditioning_scale=1.0, return_dict=False, **extra)]
