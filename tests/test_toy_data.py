"""The toy datasets: layout, loading with mmseg/mmdet classes, determinism."""
import hashlib
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from apla_mm.testing import repo_config
from apla_mm.toydata import TOY_COCO_METAINFO, TOY_SEG_METAINFO, make_toy_data


def _digest(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = osp.join(folder, name)
            with open(path, 'rb') as f:
                files[osp.relpath(path, root)] = hashlib.sha256(
                    f.read()).hexdigest()
    return files


def test_generation_is_deterministic(tmp_path):
    a = make_toy_data(str(tmp_path / 'a'), num_train=4, num_val=2)
    b = make_toy_data(str(tmp_path / 'b'), num_train=4, num_val=2)
    c = make_toy_data(str(tmp_path / 'c'), num_train=4, num_val=2, seed=1)
    for kind in ('seg', 'coco'):
        assert _digest(a[kind]) == _digest(b[kind])
        assert _digest(a[kind]) != _digest(c[kind])
    assert len(_digest(a['seg'])) == 2 * (4 + 2)


def test_unknown_kind():
    with pytest.raises(ValueError, match="'seg' and 'coco'"):
        make_toy_data('/tmp/x', kinds=('voc', ))


def test_segmentation_layout_and_labels(toy_seg_root):
    for split, count in (('training', 24), ('validation', 8)):
        images = sorted(os.listdir(osp.join(toy_seg_root, 'images', split)))
        anns = sorted(
            os.listdir(osp.join(toy_seg_root, 'annotations', split)))
        assert len(images) == len(anns) == count
        assert [i[:-4] for i in images] == [a[:-4] for a in anns]
        assert images[0].endswith('.jpg') and anns[0].endswith('.png')
    values, counts = np.zeros(256, int), 0
    for name in os.listdir(osp.join(toy_seg_root, 'annotations', 'training')):
        ann = cv2.imread(
            osp.join(toy_seg_root, 'annotations', 'training', name),
            cv2.IMREAD_UNCHANGED)
        assert ann.shape == (64, 64) and ann.dtype == np.uint8
        values += np.bincount(ann.ravel(), minlength=256)
        counts += 1
    # 1 = background, 2..5 = the four objects; 0 (ADE20K's "other") unused
    assert set(np.nonzero(values)[0]) == {1, 2, 3, 4, 5}


def test_loaded_by_mmseg_dataset(toy_seg_root):
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS
    cfg = Config.fromfile(repo_config('_base_/datasets/toy_seg.py'))
    cfg.train_dataloader.dataset.data_root = toy_seg_root
    assert tuple(cfg.metainfo.classes) == TOY_SEG_METAINFO['classes']
    assert [tuple(p) for p in cfg.metainfo.palette] == list(
        TOY_SEG_METAINFO['palette'])
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(dataset) == 24
    assert dataset.metainfo['classes'] == TOY_SEG_METAINFO['classes']
    sample = dataset[0]
    label = sample['data_samples'].gt_sem_seg.data
    assert sample['inputs'].shape == (3, 64, 64)
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4}


def test_coco_annotations_and_mmdet_dataset(toy_coco_root):
    from mmdet.datasets import CocoDataset
    with open(osp.join(toy_coco_root, 'annotations',
                       'instances_train.json')) as f:
        coco = json.load(f)
    assert [c['name'] for c in coco['categories']
            ] == list(TOY_COCO_METAINFO['classes'])
    assert len(coco['images']) == 24
    labels = {a['category_id'] for a in coco['annotations']}
    assert labels == {1, 2, 3, 4}
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
        assert 0 < ann['area'] <= w * h + 2 * (w + h) + 1
        assert len(ann['segmentation'][0]) >= 6
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = CocoDataset(
            data_root=toy_coco_root,
            ann_file='annotations/instances_val.json',
            data_prefix=dict(img='val/'),
            metainfo=TOY_COCO_METAINFO,
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', with_bbox=True, with_mask=True)
            ])
    assert len(dataset) == 8
    item = dataset[0]
    assert item['img'].shape == (128, 128, 3)
    assert len(item['gt_bboxes']) == len(item['gt_masks']) >= 1
    # polygon masks rasterise to the annotated objects
    masks = item['gt_masks'].to_ndarray()
    assert masks.sum() > 0 and masks.shape[1:] == (128, 128)
