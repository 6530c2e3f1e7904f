#!/usr/bin/env python
"""Benchmark APLA against full fine-tuning, a frozen backbone, LoRA and the
META adapter: parameters, training memory (exact account and measured
peak), training step time and inference time, on one model, input size,
batch and device. See docs/benchmark.md.

    python tools/benchmark.py seg --model vit-b16 --size 256 --batch 2 \\
        --steps 5 --warmup 2 --out docs/benchmark/seg
    python tools/benchmark.py backbone --model vit-b16 --batch 8 --no-peak
    python tools/benchmark.py seg --model tiny --steps 1 --warmup 0 --no-peak
    python tools/benchmark.py --configs configs/finetune/A.py configs/apla/B.py
    python tools/benchmark.py det --methods full,frozen,apla-r64 --device cuda
    # float32 and bf16 autocast; memory options; abstract (fake) accounts
    python tools/benchmark.py seg --model vit-b16 --precision fp32,bf16 \
        --methods full,full+all,apla-r64+cp,apla-r64+all --no-timing --no-peak
    python tools/benchmark.py seg --model dinov2-g14 --precision bf16 \
        --abstract --no-timing --no-peak --sdpa flash

Writes <out>/benchmark.{md,json,png}.
"""
import os
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
warnings.filterwarnings('ignore')  # before apla_mm's imports

from apla_mm.benchmark.cli import (benchmark_parser,  # noqa: E402
                                   comma_list, quiet)


def parse_args(argv=None):
    p = benchmark_parser()
    args = p.parse_args(argv)
    if not args.configs and args.task is None:
        p.error('give a task preset (seg, det, backbone) or --configs')
    if args.configs and args.task is not None:
        p.error('give either a task preset or --configs, not both')
    return args


def main(argv=None):
    args = parse_args(argv)
    quiet()
    os.environ.setdefault('PYTHONWARNINGS', 'ignore')
    from apla_mm.benchmark import (BenchmarkOptions, markdown,
                                   run_benchmark, write_outputs)
    opts = BenchmarkOptions(
        task=args.task,
        model=args.model,
        configs=args.configs,
        methods=comma_list(args.methods),
        size=args.size,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        infer_steps=args.infer_steps,
        device=args.device,
        peak=not args.no_peak,
        peak_steps=args.peak_steps,
        timing=not args.no_timing,
        reference=args.reference,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
        precisions=comma_list(args.precision),
        abstract=args.abstract,
        check_abstract=args.check_abstract,
        abstract_accounts=args.abstract_accounts,
        flops=args.flops,
        sdpa=args.sdpa)
    results = run_benchmark(opts)
    out = args.out or osp.join(
        'work_dirs', 'benchmark',
        f"{args.task or 'configs'}_{args.model if not args.configs else ''}"
        .rstrip('_'))
    title = args.title or (
        f'{args.task} preset, {args.model}' if not args.configs else
        'configs')
    paths = write_outputs(results, out, args.name, title)
    print(markdown(results, title))
    print('written:', ', '.join(paths.values()))


if __name__ == '__main__':
    main()
