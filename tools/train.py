#!/usr/bin/env python
"""Train an mmseg or mmdet model (with APLA or a baseline) from a config.

The command line is that of mmseg's/mmdet's ``tools/train.py``::

    python tools/train.py configs/apla/apla-r16_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py
    python tools/train.py CONFIG --work-dir work_dirs/run --amp --resume
    bash tools/dist_train.sh CONFIG 8         # torchrun, --launcher pytorch
"""
import argparse
import os

import torch
from mmengine.config import DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import apla_mm  # noqa: F401  (registers modules, checkpoint loading fix)
from apla_mm.engine.hooks import CheckpointCheckHook
from apla_mm.utils.cli import (amp_note, check_data_roots, enable_amp,
                               load_config, prepare_resume,
                               setup_cpu_distributed, use_safe_checkpoint_hook)
from apla_mm.utils.config_edit import add_peft_hook


def parse_args():
    parser = argparse.ArgumentParser(
        description='Train a segmentor or detector (apla_mm)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint, or without a value from the '
        'newest checkpoint in the work directory that verifies (damaged ones '
        'are skipped; if checkpoints exist but none is intact, the run '
        'stops instead of starting over)')
    parser.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='accept a load_from/--resume checkpoint that fits the model '
        'only partly (missing, extra or reshaped entries); by default that '
        'is an error')
    parser.add_argument(
        '--allow-partial-pretrained',
        nargs='+',
        metavar='REGEX',
        help='PEFT runs: frozen entries (full-matched names such as '
        "'backbone\\.pos_embed') allowed to stay without pretrained "
        'weights; by default an incomplete pretrained load of a frozen '
        'backbone stops the run (sets allow_partial_pretrained in the '
        'config)')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic mixed precision (float16 with loss scaling on '
        'GPUs, bfloat16 on CPUs)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate with the total batch size '
        '(needs auto_scale_lr.base_batch_size in the config)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, key=value pairs merged into '
        'it, e.g. train_cfg.max_iters=100 '
        "custom_hooks.0.rank=32 'model.backbone.out_indices=[1,3]'")
    peft = parser.add_mutually_exclusive_group()
    peft.add_argument(
        '--apla',
        nargs='*',
        action=DictAction,
        metavar='KEY=VALUE',
        help="add APLAHook to any config without editing it, keeping the "
        "config's own custom_imports and custom_hooks, e.g. --apla rank=64 "
        'seed=0 (no value: the hook defaults)')
    peft.add_argument(
        '--lora',
        nargs='*',
        action=DictAction,
        metavar='KEY=VALUE',
        help='add LoRAHook the same way, e.g. --lora rank=16 alpha=16')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main():
    args = parse_args()
    cfg, task = load_config(args)
    for flag, hook_type in (('apla', 'APLAHook'), ('lora', 'LoRAHook')):
        options = getattr(args, flag)
        if options is not None:
            hook = add_peft_hook(cfg, hook_type, dict(options))
            print_log(f'--{flag}: added {dict(hook)} to custom_hooks',
                      logger='current')
    if cfg.get('runner_type') == 'FlexibleRunner':
        hooks = [h.get('type') for h in cfg.get('custom_hooks') or []]
        late = [h for h in hooks if h in ('APLAHook', 'LoRAHook')]
        if late:
            raise ValueError(
                f'{late[0]} adapts the model in before_run, but '
                "runner_type='FlexibleRunner' wraps (shards) the model "
                'before any hook runs. Adapt at build time instead: '
                "model = dict(type='PEFTModel', model=<the model>, "
                "method='apla'|'lora', ...) (docs/distributed.md).")
    has_gpu = torch.cuda.is_available()
    if args.amp:
        wrapper = enable_amp(cfg, has_gpu)
        print_log(f'--amp: optimizer wrapper is {wrapper}, '
                  f'{amp_note(cfg, has_gpu)}', logger='current')
    if args.launcher != 'none' and not has_gpu:
        setup_cpu_distributed(cfg, args.launcher)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise RuntimeError(
                '--auto-scale-lr needs auto_scale_lr = dict('
                'base_batch_size=N) in the config.')
        cfg.auto_scale_lr.enable = True
    if args.allow_partial_pretrained:
        cfg.allow_partial_pretrained = list(args.allow_partial_pretrained)
    done = prepare_resume(cfg, args.resume)
    if done is not None:
        print_log(done, logger='current')
        return
    use_safe_checkpoint_hook(cfg)
    check_data_roots(cfg, ['train_dataloader', 'val_dataloader'])

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    runner.register_hook(
        CheckpointCheckHook(allow_partial=args.allow_partial_checkpoint))
    runner.train()


if __name__ == '__main__':
    main()
