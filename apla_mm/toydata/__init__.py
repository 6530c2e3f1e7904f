"""Toy data: a generator of small deterministic segmentation and COCO sets
and their metainfo (no dataset classes; mmseg and mmdet read the files)."""
from .toy import (TOY_COCO_METAINFO, TOY_OBJECT_CLASSES, TOY_SEG_CLASSES,
                  TOY_SEG_METAINFO, TOY_SEG_PALETTE, make_toy_coco,
                  make_toy_data, make_toy_segmentation, render_scene)

__all__ = [
    'TOY_COCO_METAINFO', 'TOY_OBJECT_CLASSES', 'TOY_SEG_CLASSES',
    'TOY_SEG_METAINFO', 'TOY_SEG_PALETTE', 'make_toy_coco', 'make_toy_data',
    'make_toy_segmentation', 'render_scene'
]
