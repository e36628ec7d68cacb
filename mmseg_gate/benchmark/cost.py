"""Cost of a config's backbone forward: FLOPs, latency, peak memory and the work counted,
as built and the straightforward way (``tools/benchmark.py`` runs each in its own process).

- ``flops``: the backbone forward (torch's FLOP counter; a multiply-add counts 2);
- ``unet_flops_per_variant`` / ``unet_full_flops_per_variant``: the truncated UNet pass
  against diffusers' full UNet forward on the same latent (what the early exit saves);
- ``latency_s_median``: median of ``iters`` timed forwards after one warm-up;
- ``peak_mem_bytes``: CUDA: peak allocated during the timed forwards; CPU: peak resident
  memory of the process during them minus its resident memory before the model was built
  (weights and activations, not the libraries); ``process_peak_mem_bytes``: the raw figure;
- ``vae_encodes`` / ``noise_samples`` / ``controlnet_passes`` / ``unet_passes`` /
  ``denoising_passes``: per image, counted (what the sharing saves);
- ``frozen_flops``: the features alone (the source, without the trainable fusion);
- DiT sources: ``blocks_run`` of ``blocks_total``, ``transformer_params`` / ``_bytes`` (what
  is kept, in the frozen precision).
"""
import statistics
import time
from collections import Counter

import torch
from diffusers import UNet2DConditionModel
from mmengine.config import Config

from mmseg.registry import MODELS
from ..engine.flops import count_flops
from ..models.amalgamation import GATEFusion
from ..sources.base import COUNTS
from ..sources.common.latents import encode_latents
from ..sources.dit import DiTSource
from ..sources.stable_diffusion import StableDiffusionSource
from .naive import NaiveGATE


def resident_bytes(field: str = 'VmRSS') -> int:
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith(field + ':')).split()[1]) * 1024


class PeakMemory:
    """Peak memory over a block. CUDA: the allocator's peak. CPU: the process's peak resident
    memory (VmHWM, reset through /proc/self/clear_refs) minus ``baseline``, its resident
    memory before the model was built (the libraries: about 0.9 GB here, the same for every
    way), which is what CUDA's figure leaves out too; ``process_peak`` keeps the raw figure."""

    def __init__(self, device: torch.device, baseline: int = 0):
        self.device, self.baseline = device, baseline

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            self.peak = self.process_peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.process_peak = resident_bytes('VmHWM')
            self.peak = self.process_peak - self.baseline


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def unet_flops(source: StableDiffusionSource, latents: torch.Tensor):
    """FLOPs of one variant's truncated UNet pass (the first variant's prompt, base weights,
    no guidance) and of diffusers' full forward of the same UNet, freshly loaded (the source
    frees the stages it never runs)."""
    num, embed = latents.shape[0], source.embedding(0)
    added = source.added_conditions(embed, latents)
    full_unet = UNet2DConditionModel.from_pretrained(
        source.model, subfolder='unet', use_safetensors=True).to(latents.device,
                                                                    latents.dtype)
    with torch.no_grad():
        truncated = count_flops(lambda: source.plain_pass(latents))
        full = count_flops(lambda: full_unet(latents, source.timestep,
                                             embed.hidden.expand(num, -1, -1),
                                             added_cond_kwargs=added))
    return truncated, full


def dit_figures(source: DiTSource) -> dict:
    """What a DiT source keeps: the blocks it runs (of the file's) and the frozen weights'
    size in their precision."""
    blocks = len(source.transformer.transformer_blocks) + len(
        getattr(source.transformer, 'single_transformer_blocks', None) or [])
    params = sum(p.numel() for p in source.transformer.parameters())
    return dict(frozen_dtype=str(source.dtype).replace('torch.', ''), blocks_run=blocks,
                blocks_total=blocks + len(source.unused_blocks), transformer_params=params,
                transformer_bytes=sum(p.numel() * p.element_size()
                                      for p in source.transformer.parameters()),
                vae_encoder_params=sum(p.numel() for p in source.vae.parameters()))


def timed(forward, device, iters: int, baseline: int):
    """Median latency and peak memory of ``iters`` calls of ``forward``."""
    times = []
    with PeakMemory(device, baseline) as memory:
        for _ in range(iters):
            sync(device)
            start = time.perf_counter()
            forward()
            sync(device)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4), memory


def measure(frozen_half, fuse, source, device, iters: int, batch: int,
            baseline: int) -> dict:
    """FLOPs, latency, peak memory and work per image of the forward ``fuse(frozen_half())``
    and the FLOPs of its ``frozen_half`` (the features alone); the work is read from the
    ``source``'s ``counts`` (a composite's sums its sources'). The frozen half is counted
    once (torch's counter is slow: it sees every op) and the fusion on its output, which
    adds up to the whole forward's count; that counted pass is also the warm-up."""
    features = []
    with torch.no_grad():
        frozen_flops = count_flops(lambda: features.append(frozen_half()))
        flops = frozen_flops + count_flops(lambda: fuse(features.pop()))
        before = Counter(getattr(source, 'counts', {}))
        latency, memory = timed(lambda: fuse(frozen_half()), device, iters, baseline)
        counts = Counter(getattr(source, 'counts', {}))
        counts.subtract(before)
    per_image = iters * batch
    return dict(flops=flops, frozen_flops=frozen_flops, latency_s_median=latency,
                peak_mem_bytes=memory.peak, process_peak_mem_bytes=memory.process_peak,
                **{name: counts[name] / per_image for name in COUNTS})


def with_backbone(cfg: Config) -> Config:
    """``cfg`` with a ``model.backbone`` to measure: an MMSeg config's own, or a
    correspondence config's ``source`` in GATE's backbone."""
    if cfg.get('model') is None and cfg.get('source') is not None:
        cfg.model = dict(backbone=dict(type='GATEBackbone', source=cfg.source))
    return cfg


def benchmark(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    """GATE as built: shared VAE encode and ControlNet passes, batched truncated UNet; any
    other source (a composite, ADM, DINOv2) as it is, without the UNet's own figures."""
    baseline = resident_bytes()
    backbone = MODELS.build(cfg.model.backbone).to(device).eval()
    source = backbone.source
    images = torch.rand(batch, 3, *shape, device=device) * 2 - 1
    # The backbone's forward in its two halves: the source, then the fusion.
    result = measure(lambda: source(backbone.to_vae_range(images), generator=torch.Generator()),
                     backbone.fuse, source, device, iters, batch, baseline)
    if isinstance(source, DiTSource):
        result.update(dit_figures(source))
    if not isinstance(source, StableDiffusionSource):
        return dict(config=cfg.filename, shape=list(shape), batch=batch, device=str(device),
                    source=repr(source), variants=source.num_variants, **result, iters=iters)
    latents = encode_latents(source.vae, torch.zeros(
        batch, 3, *(-(-s // source.size_multiple) * source.size_multiple for s in shape),
        device=device))
    truncated, full = unet_flops(source, latents)
    return dict(config=cfg.filename, shape=list(shape), batch=batch, device=str(device),
                frozen_dtype=str(source.dtype).replace('torch.', ''),
                lora_mode=source.lora_mode, variants=len(source.variants),
                **result, iters=iters, unet_flops_per_variant=truncated,
                unet_full_flops_per_variant=full, unet_fraction=round(truncated / full, 4),
                stages_run=source.stages_run)


def benchmark_naive(cfg: Config, shape, device: torch.device, iters: int, batch: int) -> dict:
    """The authors' way: a model copy and full passes per variant, then the same fusion."""
    backbone_cfg = cfg.model.backbone
    baseline = resident_bytes()
    naive = NaiveGATE(device, backbone_cfg.source)
    images = torch.rand(batch, 3, *shape, device=device) * 2 - 1
    with torch.no_grad():
        naive(images)  # learns its features' channels and strides
    fusion = GATEFusion(naive.feature_info, **{  # the backbone's settings, GATEFusion's defaults
        key: backbone_cfg[key] for key in ('num_assigners', 'assigner_cfg', 'num_refine_blocks',
                                           'norm_cfg') if key in backbone_cfg}).to(device).eval()
    return measure(lambda: naive(images), fusion, naive, device, iters, batch, baseline)


def compare(result: dict, naive: dict, fused: dict) -> dict:
    """The ratios of the cost figures in docs/benchmark.md, each against the naive way: FLOPs
    of the fused mode (no LoRA compute: the floor), latency and peak memory of the config's own mode
    as built (``speedup``, ``peak_mem_ratio``), and the fused mode's latency
    (``fused_speedup``)."""
    return dict(flops_ratio=round(fused['flops'] / naive['flops'], 4),
                frozen_flops_ratio=round(fused['frozen_flops'] / naive['frozen_flops'], 4),
                speedup=round(naive['latency_s_median'] / result['latency_s_median'], 3),
                fused_speedup=round(naive['latency_s_median'] / fused['latency_s_median'], 3),
                peak_mem_ratio=round(result['peak_mem_bytes'] / naive['peak_mem_bytes'], 4),
                process_peak_mem_ratio=round(result['process_peak_mem_bytes']
                                             / naive['process_peak_mem_bytes'], 4))
