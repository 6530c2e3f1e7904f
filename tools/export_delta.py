#!/usr/bin/env python
"""Save only what a PEFT run trained (APLA rows + neck/heads) to a small file.

    python tools/export_delta.py work_dirs/RUN/iter_600.pth --out apla_delta.pth

Merge it back into the base model with tools/merge_delta.py.
"""
import argparse
import os
import os.path as osp

import torch

import apla_mm  # noqa: F401  (checkpoint loading fix)
from apla_mm.peft.delta import export_delta
from apla_mm.utils.checkpoint_io import load_checkpoint_file


def numel(state_dict) -> int:
    return sum(v.numel() for v in state_dict.values()
               if isinstance(v, torch.Tensor))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='checkpoint of an APLA run')
    parser.add_argument(
        '--out', help='output file (default: <checkpoint>_delta.pth)')
    parser.add_argument(
        '--force', action='store_true', help='overwrite an existing --out')
    args = parser.parse_args()
    out = args.out or osp.splitext(args.checkpoint)[0] + '_delta.pth'
    if osp.exists(out) and not args.force:
        raise FileExistsError(f'{out} exists; choose another --out or pass '
                              '--force to overwrite it')
    checkpoint = load_checkpoint_file(args.checkpoint)
    delta = export_delta(checkpoint)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    torch.save(delta, out)
    full, small = numel(checkpoint['state_dict']), numel(delta['state_dict'])
    print(f'{out}: {small:,} of {full:,} values '
          f'({100.0 * small / max(full, 1):.2f}%), '
          f'{osp.getsize(out) / 2**20:.2f} MiB '
          f'(checkpoint: {osp.getsize(args.checkpoint) / 2**20:.2f} MiB)')


if __name__ == '__main__':
    main()
