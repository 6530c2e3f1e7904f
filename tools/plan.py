#!/usr/bin/env python
"""Which training settings fit in a GPU's memory, from the exact account
(fake tensors: seconds, no weights allocated). See docs/benchmark.md.

    python tools/plan.py \
        configs/finetune/upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py \
        --memory 24GB
    python tools/plan.py seg/dinov2-g14 --memory 24GB --precision bf16 \
        --sdpa flash
    python tools/plan.py seg/vit-l16 --memory 16GB --batch 4 --ranks 16,64

CONFIG is a config file (any method of it; the planner starts from its
full fine-tuning form) or a preset task/model (seg/vit-b16, seg/vit-l16,
seg/dinov2-g14, backbone/vit-b16, ...).
"""
import argparse
import json
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='APLA / full fine-tuning settings that fit in a memory '
        'budget (apla_mm, exact abstract account)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('config', help='config file or preset task/model')
    p.add_argument('--memory', required=True,
                   help='GPU memory, e.g. 24GB (GB = GiB = 2^30 bytes)')
    p.add_argument('--precision', default='fp32',
                   choices=['fp32', 'bf16', 'fp16'],
                   help='float32 or autocast dtype')
    p.add_argument('--batch', type=int, default=2,
                   help='images per step (per GPU) the answer is for')
    p.add_argument('--batches', default='1,2,4,8,16,32',
                   help='batch sizes tried for the largest that fits')
    p.add_argument('--ranks', default='16,64,256', help='APLA ranks')
    p.add_argument('--ladder', default='none,cp,cp+lean,cp+lean+heads,all',
                   help='comma-separated option sets tried, from the '
                   'fastest to the leanest (none: stock; options: cp, '
                   'lean, heads, lp, sdpa, all)')
    p.add_argument('--reserve', default='1GB',
                   help='memory kept free for what the account does not '
                   'hold (allocator slack, workspaces, CUDA context)')
    p.add_argument('--size', type=int,
                   help='input size (default: the config\'s)')
    p.add_argument('--sdpa', default='auto',
                   choices=['auto', 'math', 'flash-cpu', 'flash',
                            'efficient', 'cudnn'],
                   help='attention kernel of the target device (GPU: '
                   'flash for bf16/fp16, efficient for fp32)')
    p.add_argument('--cache-dir', default='work_dirs/plan_cache',
                   help='account cache ("" to disable)')
    p.add_argument('--json', help='also write the plan as JSON here')
    return p.parse_args(argv)


def _ints(text):
    return [int(x) for x in text.split(',') if x.strip()]


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings('ignore')
    import logging

    from mmengine.logging import MMLogger

    import apla_mm  # noqa: F401
    from apla_mm.benchmark.planner import (PlanOptions, format_plan, plan,
                                           parse_memory)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    opts = PlanOptions(
        source=args.config,
        memory=parse_memory(args.memory),
        precision=args.precision,
        batch=args.batch,
        batches=_ints(args.batches),
        ranks=_ints(args.ranks),
        reserve=parse_memory(args.reserve),
        size=args.size,
        sdpa=args.sdpa,
        cache_dir=args.cache_dir or None,
        ladder=[() if step == 'none' else tuple(step.split('+'))
                for step in args.ladder.split(',') if step.strip()])
    result = plan(opts)
    print(format_plan(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == '__main__':
    main()
