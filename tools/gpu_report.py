#!/usr/bin/env python
"""Check a CUDA machine end to end and write a report (docs/gpu.md).

    python tools/gpu_report.py --out work_dirs/gpu_report            # CUDA
    python tools/gpu_report.py --out DIR --device cpu --quick        # the
        # same code path with tiny models on a CPU (about a minute)
    python tools/gpu_report.py --out DIR --detection                 # + Mask
        # R-CNN (needs mmcv built with CUDA ops)

Sections: memory (exact account vs the allocator's peak, per model,
precision and method, with the attention kernel that ran), time (median
step with CUDA events, ratio to full fine-tuning next to the arithmetic
ratio, merged-APLA inference vs the base model), the stock ``--amp`` path
(mmseg's and our tools/train.py, float16 with a dynamic loss scale, an inf
gradient injected), and optionally detection. Writes DIR/report.md and
DIR/report.json; exits 1 if a check failed.
"""
import argparse
import os
import os.path as osp
import shlex
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
warnings.filterwarnings('ignore')  # before apla_mm's imports


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Check a CUDA machine end to end: memory account vs '
        "CUDA's allocator, step time, the stock --amp path (apla_mm)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', required=True,
                   help='output folder (report.md, report.json, amp/)')
    p.add_argument('--device', default='cuda', help='cuda[:N] or cpu')
    p.add_argument('--quick', action='store_true',
                   help='tiny models (64x64 toy UperNet) instead of ViT-B/16 '
                   'and ViT-L/16 at 512x512')
    p.add_argument('--detection', action='store_true',
                   help='also train Mask R-CNN steps (needs mmcv with '
                   'compiled ops for the device)')
    p.add_argument('--no-memory', action='store_true',
                   help='skip the memory and time sections')
    p.add_argument('--no-amp', action='store_true',
                   help='skip the stock --amp section')
    p.add_argument('--models', default='',
                   help='comma-separated seg presets (default: vit-b16,'
                   'vit-l16; tiny with --quick)')
    p.add_argument('--methods', default='',
                   help='comma-separated methods (default: full,frozen,'
                   'apla-r64,apla-r64+all,lora-r16; rank 16/8 with --quick)')
    p.add_argument('--precisions', default='',
                   help='comma-separated of fp32,bf16,fp16 (default: all '
                   'the device supports; fp16 for full and APLA only)')
    p.add_argument('--steps', type=int, default=5,
                   help='timed training steps per method (at least 5)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--amp-iters', type=int,
                   help='iterations of each --amp training run (default 50, '
                   '6 with --quick)')
    p.add_argument('--peak-process', action='store_true',
                   help='measure every peak in a fresh process instead of '
                   'resetting the peak in this one')
    p.add_argument('--threads', type=int, help='torch.set_num_threads')
    p.add_argument('--time-budget', type=float,
                   help='seconds the report may take: what would start later '
                   'is skipped and listed (tools/gpu_check.sh sets it)')
    p.add_argument('--build-info',
                   help="JSON of the install's timings (tools/gpu_check.sh) "
                   'to copy into the report')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault('PYTHONWARNINGS', 'ignore')
    from apla_mm.benchmark.cli import comma_list, quiet
    quiet()
    from apla_mm.benchmark.gpu_report import (GPUReportOptions, markdown,
                                              run_gpu_report, write_report)
    sections = [name for name, off in (('memory', args.no_memory),
                                       ('amp', args.no_amp)) if not off]
    if args.detection:
        sections.append('detection')
    if not sections:
        sys.exit('gpu_report.py: every section is switched off; drop '
                 '--no-memory or --no-amp, or add --detection.')
    argv = sys.argv[1:] if argv is None else argv
    opts = GPUReportOptions(
        out=args.out, device=args.device, quick=args.quick,
        models=comma_list(args.models), methods=comma_list(args.methods),
        precisions=comma_list(args.precisions), steps=args.steps,
        warmup=args.warmup, amp_iters=args.amp_iters, sections=sections,
        peak_process=args.peak_process, threads=args.threads,
        build_info=args.build_info, time_budget=args.time_budget,
        command=' '.join(['python tools/gpu_report.py'] +
                         [shlex.quote(a) for a in argv]))
    try:
        result = run_gpu_report(opts)
    except (RuntimeError, ValueError) as e:
        sys.exit(f'gpu_report.py: {e}')
    paths = write_report(result, args.out)
    print(markdown(result))
    print('written:', ', '.join(paths.values()))
    sys.exit(0 if result['passed'] else 1)


if __name__ == '__main__':
    main()
