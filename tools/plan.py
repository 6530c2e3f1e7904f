#!/usr/bin/env python
"""Which training settings fit in a GPU's memory, from the exact account
(fake tensors: seconds, no weights allocated). See docs/benchmark.md.

    python tools/plan.py \
        configs/finetune/upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py \
        --memory 24GB
    python tools/plan.py seg/dinov2-g14 --memory 24GB --precision bf16 \
        --sdpa flash
    python tools/plan.py seg/vit-l16 --memory 16GB --batch 4 --ranks 16,64
    python tools/plan.py seg/dinov2-g14 --memory 24GB --gpus 8 --strategy fsdp

CONFIG is a config file (any method of it; the planner starts from its
full fine-tuning form) or a preset task/model (seg/vit-b16, seg/vit-l16,
seg/dinov2-g14, backbone/vit-b16, ...).
"""
import json
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
warnings.filterwarnings('ignore')  # before apla_mm's imports

from apla_mm.benchmark.cli import (comma_list, plan_parser,  # noqa: E402
                                   quiet)


def parse_args(argv=None):
    parser = plan_parser()
    parser.add_argument('--gpus', type=int, default=1,
                        help='GPUs of the run (default 1)')
    parser.add_argument(
        '--strategy', choices=['ddp', 'fsdp'], default='ddp',
        help='ddp: every GPU holds the whole account; fsdp: parameters, '
        'gradients and optimizer state sharded over --gpus '
        '(PortableFSDPStrategy), activations not')
    return parser.parse_args(argv)


def _ints(text):
    return [int(x) for x in comma_list(text)]


def main(argv=None):
    args = parse_args(argv)
    quiet()
    from apla_mm.benchmark.planner import (PlanOptions, format_plan, plan,
                                           parse_memory)
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
                for step in comma_list(args.ladder)],
        gpus=args.gpus,
        strategy=args.strategy)
    result = plan(opts)
    print(format_plan(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == '__main__':
    main()
