"""The GATE guideline, qualitative: img2img reconstructions with and without each technique.

At high strength img2img keeps little of the image: what comes back is the model's own idea
of it, i.e. its content shift. A technique that suppresses content shift brings the
reconstruction closer to the input. Each variant of a config (prompt, ControlNets, LoRA) is
run through diffusers' img2img pipeline (ControlNet img2img where it has ControlNets), with
its prompt embedding as the features see it (long prompts chunked, text-encoder LoRA active)
and its LoRA as an adapter. The models load through the same complete-or-fail loaders as the
features; the VAE decoder is kept only here.
"""
from typing import Dict, List

import torch
from PIL import Image

from ..sources.common.conditions import build_detectors
from ..sources.common.latents import latent_scheduler
from ..sources.common.lora import activate_adapter, load_lora_adapters, load_text_encoder_loras
from ..sources.stable_diffusion.controlnets import load_controlnet
from ..sources.stable_diffusion.loading import load_stable_diffusion
from ..sources.stable_diffusion.prompts import PromptEmbedding, encode_prompt
from ..sources.stable_diffusion.variants import Variant
from .pictures import to_pil


def img2img_pipeline(parts):
    """diffusers' img2img pipeline (SD or SDXL) on already loaded parts, with a DDIM
    scheduler on the model's own noise schedule."""
    from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionXLImg2ImgPipeline)
    scheduler = latent_scheduler(DDIMScheduler, parts.scheduler.config)
    if parts.is_sdxl:
        return StableDiffusionXLImg2ImgPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1], tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1], unet=parts.unet, scheduler=scheduler)
    return StableDiffusionImg2ImgPipeline(
        vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0],
        unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


class Reconstructor:
    """img2img reconstructions of images, one per variant.

    Args:
        model: the Stable Diffusion folder or hub id (with its VAE decoder).
        variants: the parsed variants (``GATEFeatureExtractor.variants``).
        controlnets: name -> ``dict(model=..., condition=...)`` as in the configs.
        loras: name -> LoRA file.
        device, dtype: where and in which precision the pipelines run.
    """

    def __init__(self, model: str, variants: List[Variant], controlnets: Dict[str, dict],
                 loras: Dict[str, str], device: torch.device,
                 dtype: torch.dtype = torch.float32):
        parts = load_stable_diffusion(model, dtype, keep_decoder=True)
        self.pipe = img2img_pipeline(parts)
        self.pipe.set_progress_bar_config(disable=True)
        self.variants, self.device, self.dtype = variants, device, dtype
        self.xl, self.encoders, self.tokenizers = (parts.is_sdxl, parts.text_encoders,
                                                   parts.tokenizers)
        wanted = {v.adapter: (loras[v.lora], v.lora_scale) for v in variants if v.lora}
        self.scales = {adapter: scale for adapter, (_, scale) in wanted.items()}
        files = load_lora_adapters(parts.unet, {a: p for a, (p, _) in wanted.items()},
                                   self.scales)
        self.text_adapters = load_text_encoder_loras(self.encoders, files, wanted)
        self.controlnets = {name: load_controlnet(cfg['model'], parts.unet)
                            for name, cfg in controlnets.items()}
        self.detectors = build_detectors(controlnets)
        self.pipe.to(device)
        for net in self.controlnets.values():
            net.to(device, dtype)

    def _embeddings(self, variant: Variant) -> dict:
        """The variant's prompt (with its text-encoder LoRA) and an empty negative prompt
        (without), as the pipelines' ``*_embeds`` arguments."""
        adapter = variant.adapter if variant.adapter in self.text_adapters else None
        activate_adapter(self.encoders, adapter, self.text_adapters)
        positive = encode_prompt(self.encoders, self.tokenizers, variant.prompt)
        activate_adapter(self.encoders, None, self.text_adapters)
        negative = encode_prompt(self.encoders, self.tokenizers, '')
        chunks = positive.hidden.shape[1] // negative.hidden.shape[1]  # long prompts
        negative = PromptEmbedding(negative.hidden.repeat(1, chunks, 1), negative.pooled)
        kwargs = dict(prompt_embeds=positive.hidden.to(self.device, self.dtype),
                      negative_prompt_embeds=negative.hidden.to(self.device, self.dtype))
        if self.xl:
            kwargs.update(
                pooled_prompt_embeds=positive.pooled.to(self.device, self.dtype),
                negative_pooled_prompt_embeds=negative.pooled.to(self.device, self.dtype))
        return kwargs

    def _controlnet_pipe(self, variant: Variant, image: torch.Tensor):
        """The ControlNet img2img pipeline sharing this one's parts, and its arguments."""
        from diffusers import AutoPipelineForImage2Image
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
        names = [name for name, _ in variant.controlnets]
        nets = [self.controlnets[name] for name in names]
        conditions = [self.detectors[name](image[None]).to(self.device, self.dtype)
                      for name in names]
        scales = [scale for _, scale in variant.controlnets]
        single = len(nets) == 1
        pipe = AutoPipelineForImage2Image.from_pipe(
            self.pipe, controlnet=nets[0] if single else MultiControlNetModel(nets))
        pipe.set_progress_bar_config(disable=True)
        return pipe, dict(control_image=conditions[0] if single else conditions,
                          controlnet_conditioning_scale=scales[0] if single else scales)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, strength: float = 0.8, steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0) -> List[Image.Image]:
        """Reconstructions of ``image`` (3, H, W) in [-1, 1], one per variant, all from the
        same noise (``seed``)."""
        source = to_pil(image)
        outputs = []
        for variant in self.variants:
            kwargs = self._embeddings(variant)
            activate_adapter([self.pipe.unet], variant.adapter, self.scales)
            pipe = self.pipe
            if variant.controlnets:
                pipe, control = self._controlnet_pipe(variant, image.cpu())
                kwargs.update(control)
            generator = torch.Generator().manual_seed(seed)  # the same noise on any device
            result = pipe(image=source, strength=strength, num_inference_steps=steps,
                          guidance_scale=guidance_scale, generator=generator,
                          output_type='pil', **kwargs)
            outputs.append(result.images[0])
        return outputs
