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
import argparse
import os
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Parameters, training memory and time of APLA and the '
        'baselines (apla_mm)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('task', nargs='?', choices=['seg', 'det', 'backbone'],
                   help='task preset: seg (UperNet), det (Mask R-CNN), '
                   'backbone (ViT + linear head); omit with --configs')
    p.add_argument('--model', default='vit-b16',
                   choices=['tiny', 'vit-b16', 'vit-l16', 'dinov2-g14',
                            'tiny-mmseg', 'vit-b16-mmseg'],
                   help='model of the preset: timm ViT-B/16 or a tiny timm '
                   'ViT (64/96-d, 4 blocks); vit-l16, dinov2-g14: timm '
                   'ViT-L/16 and DINOv2-g/14 (seg only, use --abstract); '
                   '*-mmseg: mmseg\'s own VisionTransformer (seg only)')
    p.add_argument('--configs', nargs='+', default=[],
                   help='config files, one method each, instead of a preset')
    p.add_argument('--methods', default='',
                   help='comma-separated methods: full, full-cp, frozen, '
                   'apla-r<R>, apla-full, apla-r<R>-cp, lora-r<R>, meta, '
                   'each optionally with memory options +cp, +lean, '
                   '+heads, +lp, +sdpa or +all (e.g. apla-r64+cp+lean, '
                   'full+all); default: the preset\'s list; or config stems')
    p.add_argument('--precision', default='fp32',
                   help='comma-separated: fp32, bf16, fp16 (autocast of '
                   'the device); one memory account each, timing and peak '
                   'at the first')
    p.add_argument('--abstract', action='store_true',
                   help='compute the accounts on fake tensors (no weights '
                   'allocated, no arithmetic; for models too big to run '
                   'here); needs --no-timing --no-peak')
    p.add_argument('--abstract-accounts', action='store_true',
                   help='time the real models, but take the memory '
                   'accounts from fake tensors (seconds instead of a real '
                   'step per method)')
    p.add_argument('--check-abstract', action='store_true',
                   help='also compute each account on fake tensors and '
                   'report the difference (validates --abstract)')
    p.add_argument('--sdpa', default='auto',
                   choices=['auto', 'math', 'flash-cpu', 'flash',
                            'efficient', 'cudnn'],
                   help='scaled-dot-product attention kernel (the CUDA '
                   'ones, flash/efficient/cudnn, on a CPU only with '
                   '--abstract)')
    p.add_argument('--size', type=int, help='input height=width (default: '
                   'seg 512 (dinov2-g14 518), det 512, backbone 224; tiny '
                   '64/128/64)')
    p.add_argument('--batch', type=int, help='images per step (default: '
                   'seg 2, det 1, backbone 8)')
    p.add_argument('--steps', type=int, default=5,
                   help='timed repetitions per method')
    p.add_argument('--warmup', type=int, default=2,
                   help='discarded repetitions before them')
    p.add_argument('--infer-steps', type=int,
                   help='timed inference repetitions (default: 2 x steps)')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    p.add_argument('--no-peak', action='store_true',
                   help='skip the peak measurement (a fresh process per '
                   'method)')
    p.add_argument('--peak-steps', type=int, default=2,
                   help='training steps of each peak-measuring process')
    p.add_argument('--no-timing', action='store_true',
                   help='only parameters and memory')
    p.add_argument('--reference', help='method the ratios refer to '
                   '(default: full, else the first)')
    p.add_argument('--threads', type=int, help='torch.set_num_threads')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='output directory (default: '
                   'work_dirs/benchmark/<task>_<model>)')
    p.add_argument('--name', default='benchmark',
                   help='file name stem of the outputs')
    p.add_argument('--title', help='title of the table and chart')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if not args.configs and args.task is None:
        p.error('give a task preset (seg, det, backbone) or --configs')
    if args.configs and args.task is not None:
        p.error('give either a task preset or --configs, not both')
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings('ignore')
    os.environ.setdefault('PYTHONWARNINGS', 'ignore')
    import logging

    from mmengine.logging import MMLogger

    import apla_mm  # noqa: F401
    from apla_mm.benchmark import (BenchmarkOptions, markdown,
                                   run_benchmark, write_outputs)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    opts = BenchmarkOptions(
        task=args.task,
        model=args.model,
        configs=args.configs,
        methods=[m.strip() for m in args.methods.split(',') if m.strip()],
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
        precisions=[x.strip() for x in args.precision.split(',')
                    if x.strip()],
        abstract=args.abstract,
        check_abstract=args.check_abstract,
        abstract_accounts=args.abstract_accounts,
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
