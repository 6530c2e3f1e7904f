#!/usr/bin/env python
"""Write a checkpoint that stock mmseg/mmdet tools open with the base config.

    python tools/publish_checkpoint.py work_dirs/RUN/iter_600.pth model.pth
    python .venv/lib/python3.11/site-packages/mmseg/.mim/tools/test.py \\
        BASE_CONFIG model.pth

Training checkpoints hold mmengine objects (the message hub) that torch's
weights-only loader refuses unless apla_mm is imported; the published file
holds only the state dict (plain model keys, APLA rows merged into W_O) and a
plain ``meta``, so any tool opens it with torch's safety check on. The input
file is left as it is; an existing output is never overwritten unless
``--overwrite`` is given.
"""
import argparse

import apla_mm  # noqa: F401  (reads mmengine checkpoints weights-only)
from apla_mm.peft.base import META_KEY
from apla_mm.utils.portable_checkpoint import publish_checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='training checkpoint (iter_N.pth)')
    parser.add_argument('out', help='output file for the portable checkpoint')
    parser.add_argument(
        '--overwrite', action='store_true', help='replace an existing out')
    args = parser.parse_args(argv)
    meta = publish_checkpoint(args.checkpoint, args.out, args.overwrite)
    method = ((meta or {}).get(META_KEY) or {}).get('method', 'plain model')
    print(f'wrote {args.out} (state dict + meta, {method}); stock '
          'tools/test.py opens it with the base config.')


if __name__ == '__main__':
    main()
