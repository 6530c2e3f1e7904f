#!/usr/bin/env python
"""Generate the toy datasets and a toy "pretrained" backbone (deterministic;
a few seconds).

    python tools/make_toy_data.py    # data/toy_seg, toy_coco, toy_pretrained
    python tools/make_toy_data.py --out /tmp/toy --kinds seg

``data/toy_pretrained/vit-tiny_p8_64.pth`` holds the weights of the tiny mmseg
ViT of the toy configs (64-d, 4 layers, patch 8), drawn with a fixed seed: a
stand-in for a real pretrained file, so that the toy configs that load it
(``configs/apla/apla-r16-toybase_*``) have a base model to export deltas from
and merge them back into.
"""
import argparse
import os
import os.path as osp

from apla_mm.toydata.toy import make_toy_data

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_BACKBONE_CONFIG = osp.join(
    REPO, 'configs', 'finetune',
    'upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py')
TOY_BACKBONE_FILE = 'vit-tiny_p8_64.pth'


def make_toy_pretrained(out: str, seed: int = 0) -> str:
    """Write the toy configs' backbone weights to
    ``out/toy_pretrained/vit-tiny_p8_64.pth`` and return the path."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope

    import apla_mm  # noqa: F401
    cfg = Config.fromfile(TOY_BACKBONE_CONFIG)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    folder = osp.join(out, 'toy_pretrained')
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, TOY_BACKBONE_FILE)
    torch.save({'state_dict': backbone.state_dict()}, path + '.tmp')
    os.replace(path + '.tmp', path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data', help='parent folder')
    parser.add_argument(
        '--kinds', nargs='+', default=['seg', 'coco', 'pretrained'],
        choices=['seg', 'coco', 'pretrained'], help='what to write')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=64)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--seg-size', type=int, default=64)
    parser.add_argument('--coco-size', type=int, default=128)
    args = parser.parse_args()
    sets = [k for k in args.kinds if k != 'pretrained']
    written = make_toy_data(
        args.out, sets, seed=args.seed, seg_size=args.seg_size,
        coco_size=args.coco_size, num_train=args.num_train,
        num_val=args.num_val) if sets else {}
    if 'pretrained' in args.kinds:
        written['pretrained'] = make_toy_pretrained(args.out, args.seed)
    for kind, path in written.items():
        print(f'{kind}: {path}')


if __name__ == '__main__':
    main()
