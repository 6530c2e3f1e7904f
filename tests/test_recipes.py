"""The two recipes for a user's own dataset (``configs/recipes/``,
docs/data.md), end to end on data generated in their layout.

Each recipe is used as a user would: its dataset is read as written, a
training run starts from it with ``data_root`` pointed at the data through
``--cfg-options``, and the run's checkpoint goes through our
``tools/test.py``, ``tools/publish_checkpoint.py`` and the package's own
``test.py`` with the *base* recipe (the recipe's ``_base_`` line pointing at
the full fine-tuning config the APLA config derives from). Only the test
shrinks the model and the image sizes (to a tiny ViT at 50-128 px); the
recipe files stay what a user copies.

The data are photo-like: 480x360 images (COCO: also 640x480 and 360x480),
masks with a void label, 3 classes, a COCO json with polygons and category
ids that are not the label order.
"""
import copy
import glob
import json
import os
import os.path as osp
import runpy
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from apla_mm.compat import load_weights_only
from apla_mm.testing import REPO_ROOT, repo_config, run_tool, short_run_cfg

pytestmark = pytest.mark.slow

SEG_RECIPE = repo_config(
    'recipes/apla-r64_upernet_timm-dinov2-vit-b14_mln_8xb2-160k_'
    'myseg-518x518.py')
DET_RECIPE = repo_config(
    'recipes/apla-r64_mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_'
    'mycoco.py')

SEG_CLASSES = ('road', 'building', 'vegetation')  # mask values 1, 2, 3
#: category name -> id, in the order of the json's ``categories``: ids are
#: neither 0-based, contiguous nor sorted
COCO_CATEGORIES = {'triangle': 7, 'disk': 3, 'box': 1}
#: the recipe's ``classes``: the json's category names in the json's order
#: (mmdet numbers the labels in that order, whatever the order here)
DET_CLASSES = ('triangle', 'disk', 'box')
SEG_SPLITS = {'train': 4, 'val': 2}
#: (width, height) of the COCO images of each split
COCO_SIZES = {
    'train': [(480, 360), (640, 480), (360, 480)],
    'val': [(480, 360), (360, 480)]
}


# --------------------------------------------------------------------------
# data in the recipes' layouts
# --------------------------------------------------------------------------
def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A sky-over-ground photo-like BGR image with noise."""
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = np.array([200, 160, 120], np.float32) * (1 - 0.4 * yy)
    image = np.broadcast_to(sky, (h, w, 3)).copy()
    image += rng.normal(0, 8, size=(h, w, 3))
    return image


def _ellipse(cx, cy, rx, ry, n=24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _rect(cx, cy, rx, ry) -> np.ndarray:
    return np.array([[cx - rx, cy - ry], [cx + rx, cy - ry],
                     [cx + rx, cy + ry], [cx - rx, cy + ry]])


def _triangle(cx, cy, rx, ry) -> np.ndarray:
    return np.array([[cx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]])


def _fill(target: np.ndarray, polygon: np.ndarray, value) -> None:
    cv2.fillPoly(target, [np.round(polygon).astype(np.int32)], value)


def make_seg_folders(root: str, seed: int = 0) -> None:
    """``images/{train,val}/*.jpg`` (480x360) and two mask conventions:
    ``masks/`` with 0 = void and 1..3 = :data:`SEG_CLASSES` (the recipe's),
    ``masks255/`` with 255 = void and 0..2 = the classes."""
    rng = np.random.default_rng(seed)
    colours = {1: (90, 90, 90), 2: (60, 90, 190), 3: (50, 160, 60)}
    for split, count in SEG_SPLITS.items():
        for folder in ('images', 'masks', 'masks255'):
            os.makedirs(osp.join(root, folder, split), exist_ok=True)
        for i in range(count):
            w, h = 480, 360
            image = _background(rng, w, h)
            mask = np.zeros((h, w), np.uint8)
            horizon = int(rng.uniform(0.55, 0.7) * h)
            mask[horizon:] = 1  # road
            for value, shape in ((2, _rect), (3, _ellipse), (2, _rect)):
                rx, ry = rng.uniform(40, 90), rng.uniform(40, 80)
                cx = rng.uniform(rx, w - rx)
                cy = rng.uniform(ry, horizon)
                _fill(mask, shape(cx, cy, rx, ry), value)
            for value, colour in colours.items():
                image[mask == value] = colour + rng.normal(
                    0, 10, size=(int((mask == value).sum()), 3))
            # void: an unlabelled blob and a 10-pixel frame, as annotation
            # tools leave them
            _fill(mask, _ellipse(rng.uniform(60, w - 60),
                                 rng.uniform(60, h - 60), 35, 25), 0)
            mask[:10], mask[-10:], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0
            name = f'{split}_{i:03d}'
            cv2.imwrite(osp.join(root, 'images', split, name + '.jpg'),
                        np.clip(image, 0, 255).astype(np.uint8))
            cv2.imwrite(osp.join(root, 'masks', split, name + '.png'), mask)
            cv2.imwrite(osp.join(root, 'masks255', split, name + '.png'),
                        np.where(mask == 0, 255, mask - 1).astype(np.uint8))


def make_coco_folders(root: str, seed: int = 0) -> Dict[str, dict]:
    """``images/*.jpg`` of :data:`COCO_SIZES` and
    ``annotations/{train,val}.json`` with polygon masks; returns the jsons."""
    rng = np.random.default_rng(seed)
    shapes = {'disk': _ellipse, 'box': _rect, 'triangle': _triangle}
    colours = {'disk': (40, 40, 220), 'box': (40, 180, 60),
               'triangle': (230, 80, 50)}
    os.makedirs(osp.join(root, 'images'), exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    out = {}
    ann_id = 1
    for split, sizes in COCO_SIZES.items():
        images, annotations = [], []
        for i, (w, h) in enumerate(sizes):
            image_id = len(images) + (100 if split == 'val' else 1)
            image = _background(rng, w, h)
            for name in COCO_CATEGORIES:  # one object of each class
                rx, ry = rng.uniform(45, 80), rng.uniform(45, 80)
                cx, cy = rng.uniform(rx + 2, w - rx - 2), rng.uniform(
                    ry + 2, h - ry - 2)
                polygon = shapes[name](cx, cy, rx, ry)
                region = np.zeros((h, w), np.uint8)
                _fill(region, polygon, 1)
                image[region > 0] = colours[name]
                x0, y0 = polygon.min(0)
                x1, y1 = polygon.max(0)
                annotations.append(dict(
                    id=ann_id, image_id=image_id,
                    category_id=COCO_CATEGORIES[name],
                    segmentation=[polygon.round(1).ravel().tolist()],
                    area=float(region.sum()),
                    bbox=[float(x0), float(y0), float(x1 - x0),
                          float(y1 - y0)],
                    iscrowd=0))
                ann_id += 1
            file_name = f'{split}_{i:03d}.jpg'
            cv2.imwrite(osp.join(root, 'images', file_name),
                        np.clip(image, 0, 255).astype(np.uint8))
            images.append(dict(id=image_id, file_name=file_name, width=w,
                               height=h))
        coco = dict(
            images=images, annotations=annotations,
            categories=[dict(id=i, name=n, supercategory='shape')
                        for n, i in COCO_CATEGORIES.items()])
        with open(osp.join(root, 'annotations', f'{split}.json'), 'w') as f:
            json.dump(coco, f)
        out[split] = coco
    return out


# --------------------------------------------------------------------------
# the test's shrinking (never in the recipe) and the base recipe
# --------------------------------------------------------------------------
def user_recipe(recipe: str, out_dir: str, classes: tuple,
                base: bool = False) -> str:
    """A user's copy of ``recipe`` in ``out_dir``: its ``classes`` line
    changed to ``classes`` (the line a user edits; ``num_classes`` follows
    it) and ``_base_`` made absolute. With ``base``, ``_base_`` points at the
    full fine-tuning config the APLA config derives from: the *base recipe*
    a user of mmseg's/mmdet's own tools writes."""
    with open(recipe) as f:
        lines = f.read().splitlines(keepends=True)
    changed = {'_base_': 0, 'classes': 0}
    for i, line in enumerate(lines):
        if line.startswith("_base_ = ['../apla/apla-r64_"):
            name = line.split("'")[1]
            parent = osp.join(REPO_ROOT, 'configs', name[len('../'):])
            if base:
                parent = osp.join(
                    REPO_ROOT, 'configs', 'finetune',
                    osp.basename(name)[len('apla-r64_'):])
            assert osp.isfile(parent), parent
            lines[i] = f'_base_ = [{parent!r}]\n'
            changed['_base_'] += 1
        elif line.startswith('classes = '):
            lines[i] = f'classes = {tuple(classes)!r}\n'
            changed['classes'] += 1
    assert changed == {'_base_': 1, 'classes': 1}, changed
    path = osp.join(out_dir, ('base_' if base else '') +
                    osp.basename(recipe))
    with open(path, 'w') as f:
        f.writelines(lines)
    return path


def _resize_pipeline(pipeline: List[dict], scale: Tuple[int, int],
                     crop: Tuple[int, int]) -> List[dict]:
    """The recipe's pipeline with its resize scales and crop size replaced
    (the test's small images); every other step is kept."""
    out = copy.deepcopy(pipeline)
    for step in out:
        if step['type'] in ('Resize', 'RandomResize'):
            step['scale'] = scale
        elif step['type'] == 'RandomCrop':
            step['crop_size'] = crop
    return out


SEG_TINY = dict(model=dict(
    # 50x50 crops padded to 56x56: 4x4 patches of 14, as 512 -> 518
    data_preprocessor=dict(size=(56, 56)),
    backbone=dict(
        model_kwargs=dict(img_size=56, depth=4, embed_dim=64, num_heads=2),
        out_indices=(0, 1, 2, 3), init_cfg=None),
    neck=dict(in_channels=[64] * 4, out_channels=64),
    decode_head=dict(in_channels=[64] * 4, channels=32),
    auxiliary_head=dict(in_channels=64, channels=16),
    test_cfg=dict(_delete_=True, mode='whole')))

DET_TINY = dict(model=dict(
    data_preprocessor=dict(batch_augments=[
        dict(type='BatchFixedSizePad', size=(128, 128), pad_mask=True)]),
    backbone=dict(
        model_kwargs=dict(img_size=128, embed_dim=64, depth=2, num_heads=2,
                          drop_path_rate=0.0),
        init_cfg=None),
    neck=dict(backbone_channel=64, in_channels=[16, 32, 64, 64],
              out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, conv_out_channels=32,
                       fc_out_channels=64),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50),
                  rcnn=dict(max_per_img=20))))


def tiny_config(recipe: str, task: str, out_path: str) -> str:
    """The recipe shrunk for a few CPU iterations (tiny ViT, small images,
    no workers), dumped to ``out_path``. Data roots stay the recipe's: the
    command line points them at the data."""
    cfg = short_run_cfg(recipe, osp.dirname(out_path), max_iters=2,
                        batch_size=2, **copy.deepcopy(
                            SEG_TINY if task == 'seg' else DET_TINY))
    if task == 'seg':
        scale, crop = (100, 75), (50, 50)
    else:
        scale, crop = (128, 128), (128, 128)
    for key in ('train_dataloader', 'test_dataloader'):
        loader = cfg[key]
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.pipeline = _resize_pipeline(loader.dataset.pipeline,
                                                   scale, crop)
    cfg.log_level = 'INFO'
    cfg.dump(out_path)
    return out_path


def data_options(task: str, root: str, loaders=('train', 'test')) -> list:
    opts = [f'{k}_dataloader.dataset.data_root={root}' for k in loaders]
    if task == 'det' and 'test' in loaders:
        opts.append(f'test_evaluator.ann_file={root}/annotations/val.json')
    return opts


def finite_losses(work_dir: str) -> List[float]:
    """The training losses logged in the run's ``scalars.json``."""
    files = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    assert len(files) == 1, files
    with open(files[0]) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert [r['iter'] for r in rows] == [1, 2]
    losses = [r['loss'] for r in rows]
    assert all(np.isfinite(losses)), losses
    return losses


def metrics_of(work_dir: str) -> dict:
    files = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    assert files, f'no metrics json under {work_dir}'
    with open(files[-1]) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def docs_block(marker: str) -> str:
    """The ```python block of docs/data.md that contains ``marker``."""
    with open(osp.join(REPO_ROOT, 'docs', 'data.md')) as f:
        blocks = f.read().split('```python\n')[1:]
    found = [b.split('```', 1)[0] for b in blocks if marker in b]
    assert len(found) == 1, f'{marker!r} in {len(found)} blocks'
    return '\n' + found[0]


def publish(checkpoint: str, out: str) -> dict:
    """``tools/publish_checkpoint.py CHECKPOINT OUT`` (its ``main``, in
    this process) and the file it wrote, read weights-only."""
    tool = runpy.run_path(osp.join(REPO_ROOT, 'tools/publish_checkpoint.py'))
    tool['main']([checkpoint, out])
    published = load_weights_only(out)
    assert set(published) == {'state_dict', 'meta'}
    return published


def stock_test_tool(package: str) -> str:
    module = __import__(package)
    return osp.join(osp.dirname(module.__file__), '.mim', 'tools', 'test.py')


def train_test_publish(recipe: str, task: str, classes: tuple, root: str,
                       tmp_path, metric: str) -> Tuple[dict, str, str]:
    """Train the user's copy of ``recipe`` (shrunk) 2 iterations with
    ``tools/train.py``, test with ``tools/test.py``, publish, test the
    published file with the package's own ``test.py`` and the (shrunk) base
    recipe. Returns our metrics, the stock tool's log and the published
    file's path."""
    work = str(tmp_path / 'work')
    config = tiny_config(user_recipe(recipe, str(tmp_path), classes), task,
                         str(tmp_path / 'recipe_tiny.py'))
    base = tiny_config(
        user_recipe(recipe, str(tmp_path), classes, base=True), task,
        str(tmp_path / 'base_tiny.py'))
    base_cfg, apla_cfg = Config.fromfile(base), Config.fromfile(config)
    assert not base_cfg.get('custom_hooks')
    assert apla_cfg.custom_hooks[0]['type'] == 'APLAHook'
    assert base_cfg.model == apla_cfg.model
    assert base_cfg.test_dataloader == apla_cfg.test_dataloader

    log = run_tool(['tools/train.py', config, '--work-dir', work,
                    '--cfg-options', *data_options(task, root, ('train', ))])
    assert 'APLA: ' in log, log[-2000:]
    finite_losses(work)
    ckpt = osp.join(work, 'iter_2.pth')
    assert load_weights_only(ckpt)['meta']['apla_mm']['method'] == 'apla'

    ours = str(tmp_path / 'test_ours')
    run_tool(['tools/test.py', config, ckpt, '--work-dir', ours,
              '--cfg-options', *data_options(task, root, ('test', ))])
    metrics = metrics_of(ours)
    assert metric in metrics, metrics

    published = str(tmp_path / 'model.pth')
    state = publish(ckpt, published)
    assert state['meta']['apla_mm']['method'] == 'apla'
    model = load_weights_only(ckpt)['state_dict']
    assert state['state_dict'].keys() == model.keys()

    stock = str(tmp_path / 'test_stock')
    stock_log = run_tool([stock_test_tool(
        'mmseg' if task == 'seg' else 'mmdet'), base, published,
        '--work-dir', stock, '--cfg-options',
        *data_options(task, root, ('test', ))])
    stock_metrics = metrics_of(stock)
    # the published file is the same model as the training checkpoint
    assert stock_metrics[metric] == metrics[metric]
    return metrics, stock_log, published


# --------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def seg_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('my_seg'))
    make_seg_folders(root)
    return root


def _seg_dataset(cfg: Config, root: str, **changes):
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    dataset_cfg = copy.deepcopy(cfg.test_dataloader.dataset)
    dataset_cfg.update(data_root=root, **changes)
    return DATASETS.build(dataset_cfg)


def test_seg_recipe_reads_the_folders_and_ignores_void(seg_root, tmp_path):
    """The recipe's dataset, as written (its test pipeline: resize, then the
    masks at full size), loads every pair; void (0) becomes 255 = the
    decode heads' ignore index, class k becomes k - 1."""
    cfg = Config.fromfile(user_recipe(SEG_RECIPE, str(tmp_path),
                                      SEG_CLASSES))
    assert cfg.model.decode_head.num_classes == len(SEG_CLASSES)
    assert cfg.model.auxiliary_head.num_classes == len(SEG_CLASSES)
    assert cfg.model.decode_head.get('ignore_index', 255) == 255
    for split, count in SEG_SPLITS.items():
        loader = cfg[f'{"train" if split == "train" else "val"}_dataloader']
        assert loader.dataset.data_prefix.img_path == f'images/{split}'
    dataset = _seg_dataset(cfg, seg_root)
    assert len(dataset) == SEG_SPLITS['val']
    assert dataset.metainfo['classes'] == SEG_CLASSES
    sample = dataset[0]
    png = cv2.imread(sample['data_samples'].seg_map_path, cv2.IMREAD_UNCHANGED)
    assert png.shape == (360, 480)
    labels = sample['data_samples'].gt_sem_seg.data[0].numpy()
    assert (png == 0).sum() > 0.05 * png.size  # the void is there
    assert np.array_equal(labels, np.where(png == 0, 255, png - 1))
    assert set(np.unique(labels)) == {0, 1, 2, 255}
    # resized for the model (scale (2048, 512): 4:3 -> 683x512)
    assert tuple(sample['inputs'].shape) == (3, 512, 683)

    # masks with 255 = void and classes 0..N-1: the block of docs/data.md
    # appended to the user's copy
    copy255 = user_recipe(SEG_RECIPE, str(tmp_path), SEG_CLASSES)
    with open(copy255, 'a') as f:
        f.write(docs_block('# Masks with 255 = void'))
    cfg255 = Config.fromfile(copy255)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset_cfg = cfg255[loader].dataset
        assert dataset_cfg.reduce_zero_label is False
        assert [t.get('reduce_zero_label') for t in dataset_cfg.pipeline
                if t['type'] == 'LoadAnnotations'] == [False]
    dataset = _seg_dataset(
        cfg255, seg_root,
        data_prefix=dict(img_path='images/val', seg_map_path='masks255/val'))
    labels255 = dataset[0]['data_samples'].gt_sem_seg.data[0].numpy()
    assert np.array_equal(labels255, labels)
    # mmseg refuses a dataset and a pipeline that disagree
    with pytest.raises(AssertionError, match='reduce_zero_label'):
        _seg_dataset(cfg, seg_root, reduce_zero_label=False)[0]


def test_seg_recipe_end_to_end(seg_root, tmp_path):
    metrics, stock_log, _ = train_test_publish(
        SEG_RECIPE, 'seg', SEG_CLASSES, seg_root, tmp_path, 'mIoU')
    for name in SEG_CLASSES:  # the per-class table names the classes
        assert name in stock_log
    assert 0.0 <= metrics['mIoU'] <= 100.0


# --------------------------------------------------------------------------
# detection / instance segmentation
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('my_coco'))
    make_coco_folders(root)
    return root


def test_det_recipe_reads_the_json_by_class_name(coco_root, tmp_path):
    """The recipe's CocoDataset loads every image at its own size; labels
    follow the order of ``classes``, whatever the json's category ids."""
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(user_recipe(DET_RECIPE, str(tmp_path),
                                      DET_CLASSES))
    assert cfg.model.roi_head.bbox_head.num_classes == len(DET_CLASSES)
    assert cfg.model.roi_head.mask_head.num_classes == len(DET_CLASSES)
    with open(osp.join(coco_root, 'annotations', 'train.json')) as f:
        coco = json.load(f)
    for split in ('train', 'test'):
        dataset_cfg = copy.deepcopy(cfg[f'{split}_dataloader'].dataset)
        dataset_cfg.update(data_root=coco_root, pipeline=[])
        dataset = DATASETS.build(dataset_cfg)
        dataset.full_init()
        assert dataset.metainfo['classes'] == DET_CLASSES
        name = 'train' if split == 'train' else 'val'
        assert len(dataset) == len(COCO_SIZES[name])
        sizes = [(dataset.get_data_info(i)['width'],
                  dataset.get_data_info(i)['height'])
                 for i in range(len(dataset))]
        assert sorted(sizes) == sorted(COCO_SIZES[name])
    # the train set: each image has a triangle (id 7 -> label 0), a disk
    # (id 3 -> 1) and a box (id 1 -> 2), with their polygons
    by_label = {DET_CLASSES.index(n): i for n, i in COCO_CATEGORIES.items()}
    anns = {a['id']: a for a in coco['annotations']}
    info = DATASETS.build(dict(copy.deepcopy(cfg.train_dataloader.dataset),
                               data_root=coco_root,
                               pipeline=[])).get_data_info(0)
    assert sorted(i['bbox_label'] for i in info['instances']) == [0, 1, 2]
    for instance in info['instances']:
        assert isinstance(instance['mask'], list) and instance['mask'][0]
        match = [a for a in anns.values()
                 if a['image_id'] == info['img_id']
                 and a['segmentation'] == instance['mask']]
        assert len(match) == 1
        assert match[0]['category_id'] == by_label[instance['bbox_label']]

    # why docs/data.md says "in the json's order": mmdet numbers the labels
    # in the order of the json's categories, not in that of ``classes``
    dataset_cfg = dict(copy.deepcopy(cfg.train_dataloader.dataset),
                       data_root=coco_root, pipeline=[],
                       metainfo=dict(classes=DET_CLASSES[::-1]))
    dataset = DATASETS.build(dataset_cfg)
    assert dataset.cat2label == {7: 0, 3: 1, 1: 2}


def test_det_recipe_end_to_end(coco_root, tmp_path):
    metrics, stock_log, _ = train_test_publish(
        DET_RECIPE, 'det', DET_CLASSES, coco_root, tmp_path, 'coco/segm_mAP')
    assert 'segm_mAP' in stock_log and 'bbox_mAP' in stock_log
    assert 'coco/bbox_mAP' in metrics
