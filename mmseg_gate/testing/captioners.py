"""Tiny random captioning models in their real on-disk formats, for tests: a BLIP captioner
(transformers), a WD14-style tagger (timm folder + selected_tags.csv) and a CLIP scorer."""
import csv
import os
import os.path as osp
from typing import Sequence

import torch

# A small word list for the BLIP tokenizer; BERT's special tokens first.
_WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'photo', 'of', 'the', 'room',
          'street', 'sky', 'tree', 'wall', 'floor', 'building', 'with', 'and', 'in', 'on']


def save_random_blip(folder: str, seed: int = 0) -> str:
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)
    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    vocab = osp.join(folder, 'vocab.txt')
    with open(vocab, 'w') as f:
        f.write('\n'.join(_WORDS) + '\n')
    tokenizer = BertTokenizerFast(vocab_file=vocab)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37)
    config = BlipConfig(
        vision_config=dict(small, image_size=32, patch_size=8),
        text_config=dict(small, vocab_size=len(_WORDS), bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64),
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size=dict(height=32, width=32)),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def save_random_tagger(folder: str, tags: Sequence[tuple], seed: int = 0) -> str:
    """``tags``: (name, category) pairs; a timm ViT predicting them, in timm's HF format."""
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(seed)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=len(tags),
                              img_size=32, patch_size=8, depth=2)
    save_for_hf(model, folder, model_args=dict(img_size=32, patch_size=8, depth=2),
                safe_serialization=True)
    with open(osp.join(folder, 'selected_tags.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['tag_id', 'name', 'category', 'count'])
        for i, (name, category) in enumerate(tags):
            writer.writerow([i, name, category, 1000 - i])
    return folder


def save_random_clip(folder: str, seed: int = 0) -> str:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)

    from .architectures import save_clip_tokenizer
    torch.manual_seed(seed)
    tokenizer: CLIPTokenizer = save_clip_tokenizer(folder)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(tokenizer),
                                         max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id),
                        vision_config=dict(small, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size=dict(shortest_edge=32),
                                         crop_size=dict(height=32, width=32))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
