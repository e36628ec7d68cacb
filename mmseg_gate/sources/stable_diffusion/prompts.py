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
from typing import List, NamedTuple, Optional, Sequence, Tuple

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


def encode_token_ids(text_encoders: Sequence, ids: Sequence[torch.Tensor]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Hidden states (B, 77, dim) and SDXL's pooled embedding (B, dim) of rows of token ids
    (one (B, 77) tensor per encoder): SD1.x/2.x take the encoder's last hidden states; SDXL
    the penultimate hidden states of both encoders, concatenated along channels, and the
    second (projection) encoder's pooled output. Gradients flow if the caller allows them
    (the LoRA recipe trains through here)."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids[0])[0], None
    states, pooled = [], None
    for encoder, rows in zip(text_encoders, ids):
        out = encoder(rows, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(height: int, width: int, num: int, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """SDXL's size conditioning (N, 6): original and target size the image's, no crop."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
    return ids.expand(num, -1)


@torch.no_grad()
def encode_prompt(text_encoders: Sequence, tokenizers: Sequence, prompt: str,
                  ) -> PromptEmbedding:
    """Embedding of ``prompt`` (its 77-token chunks side by side along the sequence) by one
    text encoder (SD1.x/2.x) or two (SDXL; pooled from the first chunk)."""
    ids = [torch.tensor(chunk_token_ids(tokenizer, prompt), device=encoder.device)
           for encoder, tokenizer in zip(text_encoders, tokenizers)]
    hidden, pooled = encode_token_ids(text_encoders, ids)  # (num_chunks, 77, dim)
    return PromptEmbedding(hidden.reshape(1, -1, hidden.shape[-1]),
                           None if pooled is None else pooled[:1])
