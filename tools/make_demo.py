"""Write the embedded demo: a learnable synthetic dataset in ADE20K's folder layout and a tiny
randomly initialised Stable Diffusion in diffusers format.

    python tools/make_demo.py [--out data/demo] [--force]

The scenes are described in ``mmseg_gate/demo_data.py``. Existing outputs are kept unless ``--force``; new ones are written to
a temporary folder and renamed into place, so an interrupted run leaves nothing half-written.
"""
import argparse
import os
import os.path as osp
import shutil
import tempfile

from mmseg_gate.demo_data import write_ade_layout_dataset
from mmseg_gate.models.diffusion.architectures import save_random_stable_diffusion

def write_atomically(target: str, force: bool, writer) -> None:
    if osp.isdir(target) and not force:
        print(f'[make_demo] keeping existing {target}')
        return
    parent = osp.dirname(osp.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-')
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
    parser.add_argument('--num-train', type=int, default=48)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rewrite existing outputs')
    args = parser.parse_args()
    write_atomically(
        osp.join(args.out, 'ade', 'ADEChallengeData2016'), args.force,
        lambda path: write_ade_layout_dataset(path, args.num_train, args.num_val, args.seed))
    write_atomically(osp.join(args.out, 'tiny-sd'), args.force,
                     lambda path: save_random_stable_diffusion(path, 'tiny', args.seed))


if __name__ == '__main__':
    main()
