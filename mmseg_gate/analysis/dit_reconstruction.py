"""The GATE guideline's reconstructions on diffusion transformers (SD3.x, FLUX.1).

Each variant of a DiT config (prompt, LoRA, ControlNets) is run through diffusers' img2img
pipeline of its model -- ``StableDiffusion3Img2ImgPipeline`` or ``FluxImg2ImgPipeline`` --
or, with ControlNets, ``FluxControlNetImg2ImgPipeline``. diffusers has no SD3 ControlNet
img2img pipeline: an SD3 ControlNet variant runs ``StableDiffusion3ControlNetPipeline`` from
the img2img pipeline's own start (its ``prepare_latents`` of the image at the strength's first
timestep) over the img2img schedule's remaining sigmas, which is img2img with the ControlNet
added (tested: at ControlNet scale 0 it is the img2img reconstruction). The models load
whole, with the VAE decoder, through the same complete-or-fail loaders as the features.
"""
from typing import List, NamedTuple

import numpy as np
import torch
from diffusers import (AutoencoderKL, FluxControlNetImg2ImgPipeline, FluxImg2ImgPipeline,
                       FluxMultiControlNetModel, SD3MultiControlNetModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Img2ImgPipeline)
from PIL import Image

from ..sources.common.conditions import build_detectors
from ..sources.common.loading import load_weights
from ..sources.common.lora import activate_adapter
from ..sources.dit import GET_DIT_HINT, DiTSource, load_dit_lora, load_scheduler
from .pictures import to_pil


class Pipelines(NamedTuple):
    """A DiT family's diffusers pipelines for reconstructions: ``img2img``, ``controlnet``
    (built from the img2img one's parts) and ``multi_controlnet`` (several ControlNets as
    one); ``controlnet_img2img``: whether the ControlNet pipeline is an img2img one (else it
    starts from img2img's first latent, :func:`sd3_img2img_start`); ``classifier_free``:
    whether a call's ``guidance_scale`` is classifier-free guidance (else the source's
    guidance embedding, as its features use)."""
    img2img: type
    controlnet: type
    multi_controlnet: type
    controlnet_img2img: bool
    classifier_free: bool


# Per family: the source's ``kind``.
PIPELINES = dict(
    sd3=Pipelines(StableDiffusion3Img2ImgPipeline, StableDiffusion3ControlNetPipeline,
                  SD3MultiControlNetModel, controlnet_img2img=False, classifier_free=True),
    flux=Pipelines(FluxImg2ImgPipeline, FluxControlNetImg2ImgPipeline,
                   FluxMultiControlNetModel, controlnet_img2img=True, classifier_free=False))


def sd3_img2img_start(pipe: StableDiffusion3Img2ImgPipeline, image: Image.Image,
                      strength: float, steps: int, generator: torch.Generator):
    """SD3 img2img's first latent (the pipeline's own ``prepare_latents``) and the unshifted
    sigmas of the steps it runs, for a pipeline that takes ``latents`` and ``sigmas``
    (the scheduler shifts given sigmas again)."""
    scheduler = pipe.scheduler
    if scheduler.config.use_dynamic_shifting:
        raise ValueError('SD3 ControlNet reconstructions need a scheduler with a fixed shift '
                         '(use_dynamic_shifting=False), as SD3 and SD3.5 ship.')
    scheduler.set_timesteps(steps, device=pipe.device)
    timesteps, remaining = pipe.get_timesteps(steps, strength, pipe.device)
    pixels = pipe.image_processor.preprocess(image)
    latents = pipe.prepare_latents(pixels, timesteps[:1], 1, 1, pipe.transformer.dtype,
                                   pipe.device, generator)
    shifted = scheduler.sigmas[steps - remaining:steps].cpu().double().numpy()
    shift = scheduler.config.shift
    return latents, (shifted / (shift - (shift - 1) * shifted)).astype(np.float32).tolist()


class DiTReconstructor:
    """img2img reconstructions of images, one per variant of a DiT source.

    Args:
        source: the built :class:`DiTSource` (its model, variants and prompt settings).
        loras: name -> LoRA file, as in the config.
        controlnets: name -> ``dict(model=..., condition=...)``, as in the config.
        max_sequence_length: T5 tokens (None: the pipeline's default).
        device, dtype: where and in which precision the pipelines run.
    """

    def __init__(self, source: DiTSource, loras: dict, controlnets: dict,
                 max_sequence_length, device: torch.device, dtype: torch.dtype):
        model, self.pipelines = source.model, PIPELINES[source.kind]
        self.prompts, self.loras = source.prompts, source.variant_loras
        self.nets, self.scales = source.variant_controlnets, source.lora_scales
        self.guidance = source.guidance_scale
        self.length = dict(max_sequence_length=max_sequence_length) \
            if max_sequence_length else {}
        transformer = load_weights(source.transformer_class, model, 'transformer',
                                   GET_DIT_HINT, torch_dtype=dtype)
        for name in dict.fromkeys(n for n in self.loras if n is not None):
            load_dit_lora(transformer, name, loras[name])
        parts = dict(transformer=transformer, scheduler=load_scheduler(model),
                     vae=load_weights(AutoencoderKL, model, 'vae', GET_DIT_HINT, torch_dtype=dtype),
                     **source.load_text_parts(model, dtype))
        self.pipe = self.pipelines.img2img(**parts).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.controlnets = {name: source.load_controlnet(name, cfg).to(device, dtype)
                            for name, cfg in controlnets.items()}
        self.detectors = build_detectors(controlnets)

    def _controlnet_pipe(self, nets: dict):
        """The ControlNet pipeline sharing this one's parts, with ``nets``' models."""
        models = [self.controlnets[name] for name in nets]
        controlnet = models[0] if len(models) == 1 else self.pipelines.multi_controlnet(models)
        pipe = self.pipelines.controlnet.from_pipe(self.pipe, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, strength: float = 0.8, steps: int = 50,
                 guidance_scale: float = 7.0, seed: int = 0) -> List[Image.Image]:
        """Reconstructions of ``image`` (3, H, W) in [-1, 1], one per variant, each from the
        same seed. ``guidance_scale``: SD3's classifier-free guidance; FLUX uses the source's
        guidance embedding (as its features do) and no classifier-free guidance."""
        source = to_pil(image)
        height, width = image.shape[-2:]
        outputs = []
        for prompt, lora, nets in zip(self.prompts, self.loras, self.nets):
            activate_adapter([self.pipe.transformer], lora, self.scales)
            generator = torch.Generator().manual_seed(seed)  # the same noise on any device
            kwargs = dict(prompt=prompt, num_inference_steps=steps, generator=generator,
                          height=height, width=width, output_type='pil', **self.length,
                          guidance_scale=guidance_scale if self.pipelines.classifier_free
                          else self.guidance)
            pipe = self.pipe
            if nets:
                pipe = self._controlnet_pipe(nets)
                conditions = [self.detectors[name](image[None].cpu().float())
                              for name in nets]
                scales = list(nets.values())
                kwargs.update(control_image=conditions[0] if len(nets) == 1 else conditions,
                              controlnet_conditioning_scale=scales[0] if len(nets) == 1
                              else scales)
            if nets and not self.pipelines.controlnet_img2img:
                latents, sigmas = sd3_img2img_start(self.pipe, source, strength, steps,
                                                    generator)
                kwargs.update(latents=latents, sigmas=sigmas,
                              num_inference_steps=len(sigmas))
            else:
                kwargs.update(image=source, strength=strength)
            # SD3's ControlNet pipeline samples the condition's latent from the global RNG:
            # seed it too (and leave the caller's as it was), so that a call repeats exactly.
            devices = [self.pipe.device] if self.pipe.device.type == 'cuda' else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                outputs.append(pipe(**kwargs).images[0])
        return outputs
