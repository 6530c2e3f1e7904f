#!/usr/bin/env python
"""Generate the toy datasets (deterministic; a few seconds).

    python tools/make_toy_data.py                 # data/toy_seg, data/toy_coco
    python tools/make_toy_data.py --out /tmp/toy --kinds seg
"""
import argparse

from apla_mm.datasets.toy import make_toy_data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data', help='parent folder')
    parser.add_argument(
        '--kinds', nargs='+', default=['seg', 'coco'],
        choices=['seg', 'coco'], help='which sets to write')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=64)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--seg-size', type=int, default=64)
    parser.add_argument('--coco-size', type=int, default=128)
    args = parser.parse_args()
    written = make_toy_data(
        args.out, args.kinds, seed=args.seed, seg_size=args.seg_size,
        coco_size=args.coco_size, num_train=args.num_train,
        num_val=args.num_val)
    for kind, path in written.items():
        print(f'{kind}: {path}')


if __name__ == '__main__':
    main()
