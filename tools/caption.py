"""Caption a folder of images for tools/train_lora.py (sentences or tags).

    python tools/caption.py IMAGE_DIR --out captions.json [--style sentence|tags]
        [--model PATH_OR_HUB_ID] [--batch-size 8] [--device cuda]
        [--clip-model openai/clip-vit-large-patch14 --min-clip-score 20]

Writes ``{file name: caption}`` (what ``captions=`` in a LoRA config reads) atomically, and
``<out>.details.json`` with every caption, its CLIP score and whether it was kept. Captions
under ``--min-clip-score`` are left out, so those images train with the config's default
``caption`` (empty, as in the paper).
"""
import argparse
import json

import torch

from mmseg_gate.engine.cli import run_tool
from mmseg_gate.engine.devices import default_device, resolve_dtype
from mmseg_gate.captioning import ClipScorer, SentenceCaptioner, Tagger, caption_folder
from mmseg_gate.fileio import atomic_file

DEFAULT_MODELS = dict(sentence='Salesforce/blip-image-captioning-large',
                      tags='checkpoints/wd-vit-tagger-v3')


def parse_args():
    parser = argparse.ArgumentParser(description='Caption images for LoRA training')
    parser.add_argument('image_dir')
    parser.add_argument('--out', required=True, help='JSON file: {file name: caption}')
    parser.add_argument('--style', choices=['sentence', 'tags'], default='sentence')
    parser.add_argument('--model', help=f'captioner (default: {DEFAULT_MODELS})')
    parser.add_argument('--prompt', help='text the sentence captioner continues')
    parser.add_argument('--max-new-tokens', type=int, default=30)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--device', default=default_device())
    parser.add_argument('--clip-model', help='CLIP model for the score filter')
    parser.add_argument('--min-clip-score', type=float, default=0.0,
                        help='leave out captions scoring below this (0-100)')
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype('auto', device)
    model = args.model or DEFAULT_MODELS[args.style]
    if args.style == 'sentence':
        captioner = SentenceCaptioner(model, device, dtype, args.max_new_tokens, args.prompt)
    else:
        captioner = Tagger(model, device)
    scorer = ClipScorer(args.clip_model, device, dtype) if args.clip_model else None
    results = caption_folder(args.image_dir, captioner, args.batch_size, scorer,
                             args.min_clip_score)
    captions = {name: r['caption'] for name, r in results.items() if r['kept']}
    for path, content in ((args.out, captions), (args.out + '.details.json', results)):
        with atomic_file(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
            json.dump(content, f, indent=1, ensure_ascii=False)
    print(f'[caption] {len(captions)} of {len(results)} images captioned -> {args.out}')


if __name__ == '__main__':
    run_tool('caption', main)
