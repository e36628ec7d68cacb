"""Prompt embeddings for the UNet's cross-attention, of any length, for SD1.x/2.x and SDXL.

CLIP's text encoder sees at most 77 tokens. Longer prompts (a dataset prompt followed by all
150 ADE20K class names is about 400 tokens) are cut into chunks of 75 tokens, each wrapped in
its own start/end tokens and padded to 77, encoded separately and concatenated along the
sequence: cross-attention accepts any number of keys.

SD1.x/2.x condition on the text encoder's last hidden states. SDXL conditions on the
penultimate hidden states of both its encoders, concatenated along channels, and adds the
second encoder's pooled projection (of the first chunk) to the time embedding, as diffusers'
SDXL pipelines do.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch


class PromptEmbedding(NamedTuple):
    """``hidden``: (1, 77 * chunks, dim), the UNet's ``encoder_hidden_states``;
    ``pooled``: (1, dim) for SDXL's added condition, else None."""
    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def to(self, *args, **kwargs) -> 'PromptEmbedding':
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return PromptEmbedding(self.hidden.to(*args, **kwargs), pooled)


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
def encode_prompt(text_encoders: Sequence, tokenizers: Sequence, prompt: str,
                  ) -> PromptEmbedding:
    """Embedding of ``prompt`` by one text encoder (SD1.x/2.x) or two (SDXL)."""
    if len(text_encoders) == 1:
        encoder, tokenizer = text_encoders[0], tokenizers[0]
        ids = torch.tensor(chunk_token_ids(tokenizer, prompt), device=encoder.device)
        hidden = encoder(ids)[0]  # (num_chunks, 77, dim)
        return PromptEmbedding(hidden.reshape(1, -1, hidden.shape[-1]))
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = torch.tensor(chunk_token_ids(tokenizer, prompt), device=encoder.device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0][:1]  # the projection encoder (last): text_embeds of the first chunk
    hidden = torch.cat(states, dim=-1)
    return PromptEmbedding(hidden.reshape(1, -1, hidden.shape[-1]), pooled)
