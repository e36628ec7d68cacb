"""Captions for the LoRA recipe's training images: sentences or tags, optionally filtered.

The paper trains its LoRAs with empty captions, tags or sentences. Sentences come from a
transformers image-to-text model (BLIP, GIT, Kosmos-2, Florence-class: anything
``AutoModelForImageTextToText`` loads); tags from a WD14-style
tagger in timm's format (``config.json``, ``model.safetensors`` and ``selected_tags.csv``, as
``SmilingWolf/wd-vit-tagger-v3`` ships). Like the authors' tool, captions can be filtered by
their CLIP score against the image (``100 * cosine``, floored at 0). Weights load from local
folders or the Hugging Face cache, safetensors only.
"""
import csv
import os
import os.path as osp
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import torch
from PIL import Image

from .datasets.images import list_images, read_image
from .sources.common.loading import is_local_path


def check_model_source(model: str, what: str) -> None:
    """A folder must exist and hold safetensors weights (pickle files run code when
    loaded); a hub id (``owner/name``) is left to the Hugging Face cache."""
    if osp.isdir(model):
        if not any(f.endswith('.safetensors') for f in os.listdir(model)):
            raise ValueError(f"{what} folder '{model}' has no .safetensors weights; only "
                             'those are loaded (pickle files run code when loaded).')
    elif is_local_path(model):
        raise FileNotFoundError(f"{what} folder '{model}' does not exist. Give a folder with "
                                "the model's files, or a hub id (owner/name) that is in the "
                                'Hugging Face cache.')


@contextmanager
def naming_the_model(model: str, what: str):
    """transformers' errors for an id that is neither a folder nor cached do not say so."""
    try:
        yield
    except OSError as err:
        raise OSError(f"{what} '{model}' is neither a local folder nor a model in the Hugging "
                      f'Face cache ({str(err).strip().splitlines()[0]}). Download it first, '
                      'e.g. `hf download <owner/name> --local-dir checkpoints/<name>`, and '
                      'give that folder.') from err


class SentenceCaptioner:
    """One sentence per image from a transformers image-to-text model.

    Args:
        model: local folder or hub id (e.g. ``Salesforce/blip-image-captioning-large``).
        device: where it runs. dtype: its weights' dtype (float16 on accelerators).
        max_new_tokens: caption length limit. prompt: optional text prefix the model
            continues (e.g. ``'a photography of'`` for BLIP).
    """

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_new_tokens: int = 30, prompt: Optional[str] = None):
        from transformers import AutoProcessor
        check_model_source(model, 'Captioning model')
        with naming_the_model(model, 'Captioning model'):
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = _load_image_to_text(model, dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    @torch.no_grad()
    def __call__(self, images: List[Image.Image]) -> List[str]:
        kwargs = dict(images=images, return_tensors='pt')
        if self.prompt:
            kwargs['text'] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if 'pixel_values' in inputs:
            inputs['pixel_values'] = inputs['pixel_values'].to(self.dtype)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                  do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [' '.join(t.split()) for t in texts]


def _load_image_to_text(model: str, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText
    try:
        return AutoModelForImageTextToText.from_pretrained(model, dtype=dtype,
                                                           use_safetensors=True)
    except (ValueError, KeyError) as err:  # not an image-to-text architecture
        raise ValueError(f"'{model}' is not an image-to-text model transformers can load "
                         f'({err}).') from err


class Tagger:
    """Comma-separated tags per image from a WD14-style timm tagger.

    Args:
        model: local folder with ``config.json``, ``model.safetensors`` and
            ``selected_tags.csv`` (columns ``name`` and ``category``: 0 general, 4 character,
            9 rating).
        general_threshold / character_threshold: sigmoid thresholds (0.35 / 0.85, the
            taggers' usual values). Ratings are never used.
    """

    def __init__(self, model: str, device: torch.device, general_threshold: float = 0.35,
                 character_threshold: float = 0.85):
        import timm
        from timm.data import create_transform, resolve_data_config
        tags_file = osp.join(model, 'selected_tags.csv')
        if not osp.isdir(model):
            raise FileNotFoundError(
                f"Tagger folder '{model}' does not exist. Download a WD14 tagger in timm "
                'format, e.g. `hf download SmilingWolf/wd-vit-tagger-v3 --local-dir '
                'checkpoints/wd-vit-tagger-v3`.')
        if not osp.isfile(tags_file):
            raise FileNotFoundError(
                f"Tagger folder '{model}' has no selected_tags.csv. Download a WD14 tagger "
                'in timm format, e.g. `hf download SmilingWolf/wd-vit-tagger-v3 --local-dir '
                'checkpoints/wd-vit-tagger-v3`.')
        check_model_source(model, 'Tagger')
        with open(tags_file, newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
        self.names = [r['name'].replace('_', ' ') for r in rows]
        self.categories = torch.tensor([int(r['category']) for r in rows])
        self.model = timm.create_model(f'local-dir:{model}', pretrained=True).to(device).eval()
        if self.model.num_classes != len(rows):
            raise ValueError(f"Tagger '{model}' predicts {self.model.num_classes} tags but "
                             f'selected_tags.csv lists {len(rows)}.')
        self.transform = create_transform(**resolve_data_config(model=self.model))
        self.device = device
        self.thresholds = {0: general_threshold, 4: character_threshold}

    @torch.no_grad()
    def __call__(self, images: List[Image.Image]) -> List[str]:
        batch = torch.stack([self.transform(im) for im in images]).to(self.device)
        probs = self.model(batch).sigmoid().float().cpu()
        captions = []
        for row in probs:
            keep = [(p.item(), self.names[i]) for i, p in enumerate(row)
                    if self.categories[i].item() in self.thresholds
                    and p.item() >= self.thresholds[self.categories[i].item()]]
            captions.append(', '.join(name for _, name in sorted(keep, reverse=True)))
        return captions


class ClipScorer:
    """CLIPScore of (image, caption) pairs: ``max(100 * cosine, 0)``.

    Args:
        model: a transformers CLIP folder or hub id (e.g. ``openai/clip-vit-large-patch14``).
    """

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPProcessor
        check_model_source(model, 'CLIP model')
        with naming_the_model(model, 'CLIP model'):
            self.processor = CLIPProcessor.from_pretrained(model)
            self.model = CLIPModel.from_pretrained(model, dtype=dtype,
                                                   use_safetensors=True).to(device).eval()
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: List[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), images=images, return_tensors='pt',
                                padding=True, truncation=True).to(self.device)
        out = self.model(input_ids=inputs['input_ids'],
                         attention_mask=inputs['attention_mask'],
                         pixel_values=inputs['pixel_values'].to(self.dtype))
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds.float(),
                                                       out.text_embeds.float(), dim=-1)
        return (100 * cosine).clamp(min=0).cpu()


def caption_folder(image_dir: str, captioner: Callable[[List[Image.Image]], List[str]],
                   batch_size: int = 8, scorer: Optional[ClipScorer] = None,
                   min_score: float = 0.0, progress: bool = True) -> Dict[str, dict]:
    """``{file name: dict(caption=..., clip_score=...)}`` for every image of ``image_dir``."""
    from tqdm import tqdm
    names = list_images(image_dir)
    results: Dict[str, dict] = {}
    with tqdm(total=len(names), desc='captioning', unit='image', disable=not progress) as bar:
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            images = [read_image(osp.join(image_dir, n)) for n in chunk]
            captions = captioner(images)
            scores = scorer(images, captions).tolist() if scorer else [None] * len(chunk)
            for name, caption, score in zip(chunk, captions, scores):
                results[name] = dict(caption=caption, clip_score=score,
                                     kept=score is None or score >= min_score)
            bar.update(len(chunk))
    return results
