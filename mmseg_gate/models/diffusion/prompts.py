"""Prompt embeddings for the UNet's cross-attention, of any length.

CLIP's text encoder sees at most 77 tokens. Longer prompts (a dataset prompt followed by all
150 ADE20K class names is about 400 tokens) are cut into chunks of 75 tokens, each wrapped in
its own start/end tokens and padded to 77, encoded separately and concatenated along the
sequence: cross-attention accepts any number of keys.
"""
from typing import List

import torch


def chunk_token_ids(tokenizer, prompt: str) -> List[List[int]]:
    """Token ids of ``prompt`` as a list of full-length (77) chunks."""
    length = tokenizer.model_max_length
    body = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    step = length - 2
    pieces = [body[i:i + step] for i in range(0, len(body), step)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    chunks = []
    for piece in pieces:
        ids = [tokenizer.bos_token_id] + piece + [tokenizer.eos_token_id]
        chunks.append(ids + [pad] * (length - len(ids)))
    return chunks


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """Embedding of ``prompt`` as (1, 77 * num_chunks, dim), the UNet's `encoder_hidden_states`."""
    ids = torch.tensor(chunk_token_ids(tokenizer, prompt), device=text_encoder.device)
    hidden = text_encoder(ids)[0]  # (num_chunks, 77, dim)
    return hidden.reshape(1, -1, hidden.shape[-1])
