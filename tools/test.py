#!/usr/bin/env python
"""Evaluate a checkpoint of an mmseg or mmdet config.

The command line is that of mmseg's/mmdet's ``tools/test.py``::

    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --show-dir vis --out preds

``--out`` follows the config's library: a folder of predicted label maps for
mmseg configs (``preds/*.png``, one class value per pixel, plus coloured
copies in the dataset's palette in ``preds/color/``), a ``.pkl`` file of
detections for mmdet configs. ``--show-dir`` writes images with the
predictions drawn (``vis/vis_data/vis_image/`` for mmseg configs, ``vis/``
for mmdet configs). Relative paths are taken from the current directory; the
tool prints where it wrote. The checkpoint is verified first (zip checksums, a
state dict that fits the model; see :mod:`apla_mm.utils.checkpoint_io`).
"""
import argparse
import os
import os.path as osp
from typing import List

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import apla_mm  # noqa: F401  (registers modules, checkpoint loading fix)
from apla_mm.engine.hooks import CheckpointCheckHook
from apla_mm.utils.checkpoint_io import verify_checkpoint_file
from apla_mm.utils.cli import (check_data_roots, load_config,
                               setup_cpu_distributed)


def parse_args():
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a segmentor or detector (apla_mm)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='save predictions: a folder for mmseg configs, a .pkl file for '
        'mmdet configs')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where images with the predictions drawn are saved')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings in the config, key=value pairs')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument(
        '--tta', action='store_true', help='test-time augmentation')
    parser.add_argument(
        '--allow-partial-checkpoint',
        action='store_true',
        help='evaluate a checkpoint that fits the model only partly '
        '(missing, extra or reshaped entries keep their initial values); by '
        'default that is an error')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def trigger_visualization(cfg: Config, args, task: str) -> None:
    hooks = cfg.get('default_hooks', {})
    if 'visualization' not in hooks:
        raise RuntimeError(
            '--show/--show-dir need a visualization hook in default_hooks, '
            "e.g. visualization=dict(type='SegVisualizationHook').")
    vis = hooks['visualization']
    vis['draw'] = True
    if args.show:
        vis['show'] = True
        vis['wait_time'] = args.wait_time
    if args.show_dir:
        if task == 'det':
            vis['test_out_dir'] = osp.abspath(args.show_dir)
        else:
            cfg.visualizer['save_dir'] = osp.abspath(args.show_dir)
            vis['interval'] = 1  # mmseg draws every `interval`-th batch
    if vis.get('type') in ('SegVisualizationHook',
                           'mmseg.SegVisualizationHook'):
        # mmseg's hook builds the training loop (and its data) to read
        # runner.iter while testing; ours counts test batches itself
        vis['type'] = 'SegTestVisualizationHook'


def main():
    args = parse_args()
    verify_checkpoint_file(args.checkpoint)
    cfg, task = load_config(args)
    cfg.load_from = args.checkpoint
    if args.launcher != 'none':
        import torch
        if not torch.cuda.is_available():
            setup_cpu_distributed(cfg, args.launcher)
    if args.show or args.show_dir:
        trigger_visualization(cfg, args, task)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError('--tta needs tta_model and tta_pipeline in the '
                               'config.')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    if args.out is not None and task == 'seg':
        cfg.test_evaluator['output_dir'] = osp.abspath(args.out)
        cfg.test_evaluator['keep_results'] = True
    if args.out is not None and task == 'det' and not args.out.endswith(
            ('.pkl', '.pickle')):
        raise ValueError('--out for detection configs must be a .pkl file')
    check_data_roots(cfg, ['test_dataloader'])

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    if args.out is not None and task == 'det':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    runner.register_hook(
        CheckpointCheckHook(allow_partial=args.allow_partial_checkpoint))
    runner.test()
    report_outputs(runner, args, task)


def colorize_label_maps(folder: str, palette, reduce_zero_label: bool) -> int:
    """Write ``folder/color/<name>.png``: the label maps of ``--out`` in
    the dataset's palette (the maps hold class values 0..N, which look black
    in an image viewer). Returns the number of images written."""
    import glob

    import numpy as np
    from PIL import Image
    files = sorted(glob.glob(osp.join(folder, '*.png')))
    if not files or not palette:
        return 0
    out_dir = osp.join(folder, 'color')
    os.makedirs(out_dir, exist_ok=True)
    # With reduce_zero_label, mmseg writes class c as c + 1 (0: ignored).
    offset = 1 if reduce_zero_label else 0
    lut = np.zeros((256, 3), dtype=np.uint8)
    for index, colour in enumerate(palette):
        if index + offset < 256:
            lut[index + offset] = colour
    for path in files:
        labels = np.asarray(Image.open(path))
        Image.fromarray(lut[labels]).save(
            osp.join(out_dir, osp.basename(path)))
    return len(files)


def report_outputs(runner, args, task: str) -> List[str]:
    """Say where the predictions went (also returned, one line each)."""
    from mmengine.logging import print_log
    lines = []
    if args.out is not None:
        if task == 'seg':
            folder = osp.abspath(args.out)
            dataset = runner.test_dataloader.dataset
            count = colorize_label_maps(
                folder, dataset.metainfo.get('palette'),
                bool(getattr(dataset, 'reduce_zero_label', False)))
            lines.append(
                f'--out: label maps (one class value per pixel) in {folder}/'
                f'; coloured copies ({count}) in {folder}/color/')
        else:
            lines.append(f'--out: detections in {osp.abspath(args.out)}')
    if args.show_dir:
        where = osp.abspath(args.show_dir)
        if task == 'seg':
            # mmengine's LocalVisBackend: <save_dir>/vis_data/vis_image
            where = osp.join(where, 'vis_data', 'vis_image')
        lines.append(f'--show-dir: images with the predictions drawn in '
                     f'{where}/')
    for line in lines:
        print_log(line, logger='current')
    return lines

if __name__ == '__main__':
    main()
