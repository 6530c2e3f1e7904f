#!/usr/bin/env python
"""Merge a delta file back into a full checkpoint of the base model.

    # base weights from a full checkpoint of the base model
    python tools/merge_delta.py apla_delta.pth --base base.pth --out merged.pth
    # or: build the base model from a config (pretrained weights via init_cfg)
    python tools/merge_delta.py apla_delta.pth --config CONFIG --out merged.pth

The result is a plain checkpoint of the base architecture: evaluate it with
tools/test.py and the base (or the APLA) config.
"""
import argparse
import os
import os.path as osp

import torch

import apla_mm  # noqa: F401  (registers modules, checkpoint loading fix)
from apla_mm.peft.delta import merge_delta
from apla_mm.utils.checkpoint_io import load_checkpoint_file


def base_from_config(path: str) -> dict:
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(path)
    scope = cfg.get('default_scope')
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
    model.init_weights()
    return model.state_dict()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('delta', help='file written by tools/export_delta.py')
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--base', help='full checkpoint of the base model')
    src.add_argument(
        '--config', help='config whose model (with its pretrained weights) '
        'is the base')
    parser.add_argument('--out', required=True, help='merged checkpoint')
    parser.add_argument(
        '--no-check', action='store_true',
        help='skip the check that the base has the frozen weights the delta '
        'was trained with')
    parser.add_argument(
        '--force', action='store_true', help='overwrite an existing --out')
    args = parser.parse_args()
    if osp.exists(args.out) and not args.force:
        raise FileExistsError(f'{args.out} exists; choose another --out or '
                              'pass --force to overwrite it')
    delta = load_checkpoint_file(args.delta)
    if args.base:
        base = load_checkpoint_file(args.base)
        base = base.get('state_dict', base)
    else:
        base = base_from_config(args.config)
    merged = merge_delta(base, delta, check_fingerprint=not args.no_check)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    torch.save(
        dict(meta=dict(apla_mm_merged_from=osp.basename(args.delta)),
             state_dict=merged), args.out)
    print(f'{args.out}: merged {len(delta["state_dict"])} entries into '
          f'{len(merged)}')


if __name__ == '__main__':
    main()
