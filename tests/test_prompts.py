import pytest
from transformers import CLIPTokenizer

from mmseg_gate.sources.stable_diffusion.prompts import chunk_token_ids, encode_prompt


@pytest.fixture(scope='module')
def tokenizer(tiny_sd):
    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder='tokenizer')


def test_tokenizer_is_clips_vocabulary(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer('a photo').input_ids == [49406, 320, 1125, 49407]


def test_short_prompt_is_one_standard_chunk(tokenizer):
    chunks = chunk_token_ids(tokenizer, 'a photo of a street')
    standard = tokenizer('a photo of a street', padding='max_length', max_length=77).input_ids
    assert chunks == [standard]


def test_long_prompt_is_chunked_without_losing_tokens(tokenizer):
    prompt = ', '.join(['wall', 'building', 'sky', 'floor', 'tree', 'ceiling'] * 30)
    body = tokenizer(prompt, add_special_tokens=False).input_ids
    chunks = chunk_token_ids(tokenizer, prompt)
    assert len(chunks) == -(-len(body) // 75) > 1
    assert all(len(c) == 77 and c[0] == tokenizer.bos_token_id for c in chunks)
    recovered = [t for c in chunks for t in c[1:1 + 75]][:len(body)]
    assert recovered == body


def test_long_prompt_embedding_concatenates_chunks(tiny_sd, tokenizer):
    from transformers import CLIPTextModel
    encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder='text_encoder')
    prompt = ' '.join(['a highly realistic photo of the real world'] * 20)
    embeds = encode_prompt([encoder], [tokenizer], prompt)
    num_chunks = len(chunk_token_ids(tokenizer, prompt))
    assert embeds.hidden.shape == (1, 77 * num_chunks, 32) and embeds.pooled is None
    assert encode_prompt([encoder], [tokenizer], '').hidden.shape == (1, 77, 32)
