"""The command lines of ``tools/benchmark.py`` and ``tools/plan.py``: their
parsers, the arguments they share (the precision, the attention kernel,
the input size and the batch, defined once in :func:`add_common_arguments`)
and the quiet start of both tools."""
import argparse
import logging
import warnings
from typing import List, Optional

from .presets import PRESETS, TASKS
from .sdpa import SDPA_BACKENDS
from .specs import PRECISIONS


def new_parser(description: str) -> argparse.ArgumentParser:
    """The tool's parser, defaults shown in ``--help``."""
    return argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_common_arguments(parser: argparse.ArgumentParser,
                         several_precisions: bool,
                         batch_default: Optional[int],
                         batch_help: str, size_help: str) -> None:
    """Add ``--precision``, ``--sdpa``, ``--size`` and ``--batch``.

    Args:
        parser (argparse.ArgumentParser): The tool's parser.
        several_precisions (bool): ``--precision`` takes a comma-separated
            list (one memory account each: ``tools/benchmark.py``) instead
            of one of :data:`~.specs.PRECISIONS` (``tools/plan.py``).
        batch_default (int, optional): Default of ``--batch`` (None: the
            preset's or the config's).
        batch_help (str): What ``--batch`` is.
        size_help (str): What ``--size`` defaults to.
    """
    if several_precisions:
        parser.add_argument(
            '--precision', default='fp32',
            help='comma-separated: fp32, bf16, fp16 (autocast of the '
            'device); one memory account each, timing and peak at the first')
    else:
        parser.add_argument('--precision', default='fp32',
                            choices=list(PRECISIONS),
                            help='float32 or autocast dtype')
    parser.add_argument(
        '--sdpa', default='auto', choices=list(SDPA_BACKENDS),
        help='scaled-dot-product attention kernel (on a GPU torch picks '
        'flash for bf16/fp16, efficient for fp32; the CUDA ones, '
        'flash/efficient/cudnn, run on a CPU only in the abstract account)')
    parser.add_argument('--size', type=int,
                        help=f'input height=width (default: {size_help})')
    parser.add_argument('--batch', type=int, default=batch_default,
                        help=batch_help)


def comma_list(text: str) -> List[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']``."""
    return [item.strip() for item in text.split(',') if item.strip()]


def quiet() -> None:
    """Silence Python warnings and mmengine's info logs (the tools print
    their own tables)."""
    warnings.filterwarnings('ignore')
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


#: The on/off switches of ``tools/benchmark.py``.
BENCHMARK_SWITCHES = {
    '--abstract':
    'compute the accounts on fake tensors (no weights allocated, no '
    'arithmetic; for models too big to run here); needs --no-timing '
    '--no-peak',
    '--abstract-accounts':
    'time the real models, but take the memory accounts from fake tensors '
    '(seconds instead of a real step per method)',
    '--check-abstract':
    'also compute each account on fake tensors and report the difference '
    '(validates --abstract)',
    '--flops':
    'count the floating-point operations of one training step per method '
    '(the floor of its time; on fake tensors with --abstract/'
    '--abstract-accounts)',
    '--no-peak':
    'skip the peak measurement (a fresh process per method)',
    '--no-timing': 'only parameters and memory',
    '--no-progress': 'no progress bar',
}


def benchmark_parser() -> argparse.ArgumentParser:
    """The arguments of ``tools/benchmark.py``."""
    p = new_parser(
        'Parameters, training memory and time of APLA and the '
        'baselines (apla_mm)')
    p.add_argument('task', nargs='?', choices=list(TASKS),
                   help='task preset: seg (UperNet), det (Mask R-CNN), '
                   'backbone (ViT + linear head); omit with --configs')
    p.add_argument('--model', default='vit-b16',
                   choices=sorted({model for _, model in PRESETS}),
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
    add_common_arguments(
        p, several_precisions=True, batch_default=None,
        batch_help='images per step (default: seg 2, det 1, backbone 8)',
        size_help='seg 512 (dinov2-g14 518), det 512, backbone 224; tiny '
        '64/128/64')
    p.add_argument('--steps', type=int, default=5,
                   help='timed repetitions per method')
    p.add_argument('--warmup', type=int, default=2,
                   help='discarded repetitions before them')
    p.add_argument('--infer-steps', type=int,
                   help='timed inference repetitions (default: 2 x steps)')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    p.add_argument('--peak-steps', type=int, default=2,
                   help='training steps of each peak-measuring process')
    p.add_argument('--reference', help='method the ratios refer to '
                   '(default: full, else the first)')
    p.add_argument('--threads', type=int, help='torch.set_num_threads')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='output directory (default: '
                   'work_dirs/benchmark/<task>_<model>)')
    p.add_argument('--name', default='benchmark',
                   help='file name stem of the outputs')
    p.add_argument('--title', help='title of the table and chart')
    for flag, text in BENCHMARK_SWITCHES.items():
        p.add_argument(flag, action='store_true', help=text)
    return p


def plan_parser() -> argparse.ArgumentParser:
    """The arguments of ``tools/plan.py``."""
    p = new_parser(
        'APLA / full fine-tuning settings that fit in a memory '
        'budget (apla_mm, exact abstract account)')
    p.add_argument('config', help='config file or preset task/model')
    p.add_argument('--memory', required=True,
                   help='GPU memory, e.g. 24GB (GB = GiB = 2^30 bytes)')
    add_common_arguments(
        p, several_precisions=False, batch_default=2,
        batch_help='images per step (per GPU) the answer is for',
        size_help="the config's or the preset's")
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
    p.add_argument('--cache-dir', default='work_dirs/plan_cache',
                   help='account cache ("" to disable)')
    p.add_argument('--json', help='also write the plan as JSON here')
    return p


__all__ = [
    'add_common_arguments', 'benchmark_parser', 'comma_list', 'new_parser',
    'plan_parser', 'quiet'
]
