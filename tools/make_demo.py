"""Write the embedded demo: a learnable synthetic dataset in ADE20K's folder layout (and a
label-scarce one in DDPM-segmentation's, correspondence pairs in SPair-71k's), a tiny Stable
Diffusion in diffusers format, a ControlNet for it and a tiny ADM in guided-diffusion's
checkpoint layout (the label-scarce demo's second source) and a tiny random DINOv2 in
transformers' format (the GATE + DINOv2 correspondence demo).

    python tools/make_demo.py [--out data/demo] [--force] [--vae-steps 300]

The scenes are described in ``mmseg_gate/testing/demo_data.py``. The tiny model's UNet and text
encoder keep their random weights, but its VAE is first trained briefly as an autoencoder on
the demo images: a random VAE encoder's 4-channel latent keeps almost nothing of the image
(a linear probe of the demo classes on it scores chance, 25%), whereas a real SD VAE's latent
is a faithful code of the image. Existing outputs are kept unless ``--force``; new ones are written to
a temporary folder and renamed into place, so an interrupted run leaves nothing half-written.
"""
import argparse
import glob
import os
import os.path as osp
import shutil
import tempfile

import torch
from diffusers import AutoencoderKL

from mmseg_gate.datasets.images import list_images, read_image, to_model_range
from mmseg_gate.engine.cli import run_tool
from mmseg_gate.testing.demo_data import (write_ade_layout_dataset,
                                          write_ddpm_seg_layout_dataset,
                                          write_dhf_split_files, write_spair_layout_dataset)
from mmseg_gate.testing.architectures import (save_random_adm, save_random_controlnet,
                                              save_random_dinov2,
                                              save_random_stable_diffusion,
                                              unit_variance_scaling)

_TMP_PREFIX = '.make_demo-tmp-'


def load_images(folder: str) -> torch.Tensor:
    """All images of ``folder`` as one (N, 3, H, W) tensor in [-1, 1]."""
    return torch.stack([to_model_range(read_image(osp.join(folder, name)))
                        for name in list_images(folder)])


def train_vae(folder: str, images: torch.Tensor, steps: int, seed: int, crop: int = 64,
              batch_size: int = 8) -> None:
    """Fit the VAE at ``folder`` as an autoencoder on random crops of ``images``, then
    recalibrate its latent scaling factor and save it in place."""
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        top = int(torch.randint(0, images.shape[2] - crop + 1, (1, ), generator=generator))
        left = int(torch.randint(0, images.shape[3] - crop + 1, (1, ), generator=generator))
        index = torch.randint(0, len(images), (batch_size, ), generator=generator)
        batch = images[index, :, top:top + crop, left:left + crop]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            print(f'[make_demo] VAE step {step}/{steps}: reconstruction loss {loss.item():.4f}')
    vae.register_to_config(scaling_factor=unit_variance_scaling(vae))
    vae.save_pretrained(folder)


def write_tiny_model(path: str, dataset_root: str, vae_steps: int, seed: int) -> None:
    save_random_stable_diffusion(path, 'tiny', seed)
    if vae_steps > 0:
        images = load_images(osp.join(dataset_root, 'images', 'training'))
        train_vae(osp.join(path, 'vae'), images, vae_steps, seed)


def write_atomically(target: str, force: bool, writer) -> None:
    if osp.isdir(target) and not force:
        print(f'[make_demo] keeping existing {target}')
        return
    parent = osp.dirname(osp.abspath(target))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(osp.join(glob.escape(parent), _TMP_PREFIX + '*')):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    tmp = tempfile.mkdtemp(dir=parent, prefix=_TMP_PREFIX)
    try:
        writer(osp.join(tmp, 'out'))
        if osp.isdir(target):
            shutil.rmtree(target)
        os.rename(osp.join(tmp, 'out'), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f'[make_demo] wrote {target}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data/demo', help='output folder')
    parser.add_argument('--num-train', type=int, default=160)
    parser.add_argument('--num-val', type=int, default=32)
    parser.add_argument('--num-scarce-train', type=int, default=20,
                        help='label-scarce demo: training images (the benchmark: 30-40)')
    parser.add_argument('--num-scarce-test', type=int, default=20)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--vae-steps', type=int, default=300,
                        help='autoencoder training steps of the tiny VAE (0: keep it random)')
    parser.add_argument('--force', action='store_true', help='rewrite existing outputs')
    args = parser.parse_args()
    dataset_root = osp.join(args.out, 'ade', 'ADEChallengeData2016')
    write_atomically(
        dataset_root, args.force,
        lambda path: write_ade_layout_dataset(path, args.num_train, args.num_val, args.seed))
    write_atomically(
        osp.join(args.out, 'label_scarce'), args.force,
        lambda path: write_ddpm_seg_layout_dataset(path, args.num_scarce_train,
                                                   args.num_scarce_test, seed=args.seed))
    write_atomically(
        osp.join(args.out, 'spair'), args.force,
        lambda path: (write_spair_layout_dataset(path, dict(trn=40, val=10, test=20),
                                                 seed=args.seed),
                      # Diffusion Hyperfeatures' split files of the same pairs (the test
                      # file: the first half of the test split, as test-360 is a subset).
                      write_dhf_split_files(path, per_file=dict(test=10))))
    write_atomically(osp.join(args.out, 'tiny-sd'), args.force,
                     lambda path: write_tiny_model(path, dataset_root, args.vae_steps, args.seed))
    write_atomically(osp.join(args.out, 'controlnet-canny'), args.force,
                     lambda path: save_random_controlnet(path, osp.join(args.out, 'tiny-sd'),
                                                         args.seed))
    write_atomically(osp.join(args.out, 'tiny-adm'), args.force,
                     lambda path: save_random_adm(osp.join(path, 'adm.pt'), seed=args.seed))
    write_atomically(osp.join(args.out, 'tiny-dinov2'), args.force,
                     lambda path: save_random_dinov2(path, seed=args.seed))


if __name__ == '__main__':
    run_tool('make_demo', main)
