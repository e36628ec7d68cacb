"""What the tools share: MMSeg's command-line conventions, and errors as one clear message."""
import argparse
import os
import os.path as osp
import sys
from typing import Callable, Optional

from mmengine.config import Config, DictAction

from .distributed import setup_cpu_distributed


class UsageError(ValueError):
    """An argument or input file a tool cannot use; tools print it and exit, without a
    traceback (the message names the argument or file and the problem)."""


# Errors a tool prints as one message instead of a traceback. Ours (UsageError, StoreError,
# bad weights, checkpoints and datasets) are ValueErrors, FileNotFoundErrors or KeyErrors whose
# message names the file or argument, the problem and the fix.
CLEAR_ERRORS = (ValueError, OSError, KeyError)
TRACEBACK_ENV = 'GATE_TRACEBACK'


def run_tool(name: str, main: Callable[[], object]) -> None:
    """Run a tool's ``main``; one of :data:`CLEAR_ERRORS` ends it with its message on stderr
    and exit status 1 (``GATE_TRACEBACK=1``: with the traceback)."""
    try:
        main()
    except CLEAR_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV) == '1':
            raise
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f'[{name}] error: {text}\n({TRACEBACK_ENV}=1 shows the traceback)',
              file=sys.stderr)
        raise SystemExit(1) from None


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (e.g. model.backbone.source.model=PATH)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def read_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """The config at ``path`` with ``--cfg-options`` merged in; a missing file is named."""
    if not osp.isfile(path):
        raise UsageError(f"Config '{path}' does not exist.")
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_config(args: argparse.Namespace) -> Config:
    """Config from ``args.config`` with CLI overrides, work dir and launcher applied."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = read_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    # Safe, exact and atomic checkpoints, unless the config picks its own runner.
    cfg.setdefault('runner_type', 'GATERunner')
    setup_cpu_distributed(cfg)
    return cfg
