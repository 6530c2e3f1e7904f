"""Deterministic toy datasets for quick, CPU-only experiments and tests.

Two small sets are drawn from the same scene generator:

* a semantic-segmentation set in ADE20K's folder layout
  (``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``, label 0 = "other", classes
  from 1, read with ``reduce_zero_label=True``) for mmseg's
  ``BaseSegDataset``;
* an instance set in COCO format (``{train,val}/*.jpg`` and
  ``annotations/instances_{train,val}.json`` with polygon masks) for mmdet's
  ``CocoDataset``.

Each object class has its own shape, colour and texture (a red disk, a green
square, a blue triangle, a yellow-black striped bar) on a low-saturation,
noisy background, so a small model learns them within minutes on a CPU and
mIoU / AP rise far above chance. Everything is drawn from ``numpy``'s
``PCG64`` generator seeded per image, so the files are identical on every run
with the same arguments.
"""
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

#: Object classes, in label order (COCO category ids start at 1).
TOY_OBJECT_CLASSES: Tuple[str, ...] = ('disk', 'square', 'triangle', 'bar')
#: Semantic classes: background first (annotation value 1), then the objects.
TOY_SEG_CLASSES: Tuple[str, ...] = ('background', ) + TOY_OBJECT_CLASSES
#: RGB palette used by the visualisers.
TOY_SEG_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (120, 120, 120), (220, 40, 40), (40, 180, 60), (50, 80, 230),
    (240, 200, 20))
TOY_SEG_METAINFO = dict(classes=TOY_SEG_CLASSES, palette=TOY_SEG_PALETTE)
TOY_COCO_METAINFO = dict(
    classes=TOY_OBJECT_CLASSES, palette=TOY_SEG_PALETTE[1:])

# Base colours (BGR, for cv2) of the object classes.
_BASE_BGR = {
    'disk': (40, 40, 220),
    'square': (60, 180, 40),
    'triangle': (230, 80, 50),
    'bar': (20, 200, 240),
}


@dataclass
class ToyObject:
    """One drawn object: its class index (0-based in
    :data:`TOY_OBJECT_CLASSES`) and outline polygon in pixels."""
    label: int
    polygon: np.ndarray  # (K, 2) float32, x/y


def _polygon(name: str, cx: float, cy: float, r: float,
             angle: float) -> np.ndarray:
    if name == 'disk':
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif name == 'square':
        t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif name == 'triangle':
        t = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif name == 'bar':
        half = np.array([[-1.0, -0.45], [1.0, -0.45], [1.0, 0.45],
                         [-1.0, 0.45]]) * r
        c, s = np.cos(angle), np.sin(angle)
        pts = half @ np.array([[c, s], [-s, c]])
    else:  # pragma: no cover - guarded by TOY_OBJECT_CLASSES
        raise KeyError(name)
    return (pts + np.array([cx, cy])).astype(np.float32)


def _fill(mask_img: np.ndarray, polygon: np.ndarray, value) -> None:
    cv2.fillPoly(mask_img, [np.round(polygon).astype(np.int32)], value)


def render_scene(rng: np.random.Generator,
                 size: int,
                 max_objects: int = 3,
                 min_radius: float = 0.12,
                 max_radius: float = 0.22) -> Tuple[np.ndarray, np.ndarray,
                                                    List[ToyObject]]:
    """Draw one image with 1..``max_objects`` non-overlapping objects.

    Args:
        rng (np.random.Generator): Source of randomness.
        size (int): Image side in pixels.
        max_objects (int): Upper bound of objects per image.
        min_radius (float): Smallest object radius as a fraction of ``size``.
        max_radius (float): Largest object radius as a fraction of ``size``.

    Returns:
        tuple: ``(image, semantic, objects)``: a ``(size, size, 3)`` BGR
        uint8 image; a uint8 map with 0 for background and ``label + 1`` for
        object pixels; the drawn :class:`ToyObject` list.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(70, 150, size=3)
    tilt = rng.uniform(-25, 25, size=(2, 3))
    image = (base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
             + rng.normal(0, 10, size=(size, size, 3)))
    semantic = np.zeros((size, size), np.uint8)
    objects: List[ToyObject] = []
    boxes: List[Tuple[float, float, float]] = []
    count = int(rng.integers(1, max_objects + 1))
    for _ in range(count * 20):
        if len(objects) == count:
            break
        label = int(rng.integers(len(TOY_OBJECT_CLASSES)))
        r = float(rng.uniform(min_radius, max_radius)) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if any((cx - x)**2 + (cy - y)**2 < (r + rr + 2)**2
               for x, y, rr in boxes):
            continue
        name = TOY_OBJECT_CLASSES[label]
        poly = _polygon(name, cx, cy, r, float(rng.uniform(0, np.pi)))
        region = np.zeros((size, size), np.uint8)
        _fill(region, poly, 1)
        inside = region.astype(bool)
        colour = np.array(_BASE_BGR[name], np.float32) + rng.normal(0, 12, 3)
        shade = colour + rng.normal(0, 6, size=(size, size, 3))
        if name == 'bar':
            period = max(3.0, r / 2.5)
            stripes = (np.floor((xx + yy) * size / period) % 2).astype(bool)
            shade[stripes] = rng.uniform(10, 40)
        image[inside] = shade[inside]
        semantic[inside] = label + 1
        objects.append(ToyObject(label, poly))
        boxes.append((cx, cy, r))
    return np.clip(image, 0, 255).astype(np.uint8), semantic, objects


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    split_id = {'train': 0, 'val': 1}[split]
    return np.random.Generator(np.random.PCG64([seed, split_id, index]))


def _write_jpg(path: str, image: np.ndarray) -> None:
    if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f'could not write {path}')


def make_toy_segmentation(root: str,
                          num_train: int = 64,
                          num_val: int = 16,
                          size: int = 64,
                          seed: int = 0) -> Dict[str, int]:
    """Write the toy semantic-segmentation set in ADE20K's layout.

    Annotation PNGs hold 1 for background and 2.. for the objects
    (``label + 2``), 0 is unused ("other" in ADE20K), so mmseg reads them with
    ``reduce_zero_label=True`` into the classes of :data:`TOY_SEG_CLASSES`.

    Args:
        root (str): Output folder (created).
        num_train (int): Training images.
        num_val (int): Validation images.
        size (int): Image side in pixels.
        seed (int): Seed; the same arguments give identical files.

    Returns:
        dict: Number of images written per split.
    """
    counts = {}
    for split, folder, num in (('train', 'training', num_train),
                               ('val', 'validation', num_val)):
        img_dir = osp.join(root, 'images', folder)
        ann_dir = osp.join(root, 'annotations', folder)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(num):
            image, semantic, _ = render_scene(_image_rng(seed, split, i), size)
            name = f'toy_{split}_{i:05d}'
            _write_jpg(osp.join(img_dir, name + '.jpg'), image)
            cv2.imwrite(osp.join(ann_dir, name + '.png'), semantic + 1)
        counts[split] = num
    return counts


def _coco_annotation(obj: ToyObject, size: int, ann_id: int,
                     image_id: int) -> dict:
    poly = np.clip(obj.polygon, 0, size - 1)
    x0, y0 = poly.min(0)
    x1, y1 = poly.max(0)
    mask = np.zeros((size, size), np.uint8)
    _fill(mask, obj.polygon, 1)
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=obj.label + 1,
        segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]],
        area=float(mask.sum()),
        bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        iscrowd=0)


def make_toy_coco(root: str,
                  num_train: int = 64,
                  num_val: int = 16,
                  size: int = 128,
                  seed: int = 0,
                  max_objects: int = 4) -> Dict[str, int]:
    """Write the toy instance set in COCO format.

    Layout: ``{root}/{train,val}/*.jpg`` and
    ``{root}/annotations/instances_{train,val}.json``; categories are
    :data:`TOY_OBJECT_CLASSES` with ids from 1; masks are polygons.

    Args:
        root, num_train, num_val, size, seed: As in
            :func:`make_toy_segmentation`.
        max_objects (int): Upper bound of objects per image.

    Returns:
        dict: Number of annotated objects per split.
    """
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(TOY_OBJECT_CLASSES)
    ]
    counts = {}
    for split, num in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(root, split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(num):
            image, _, objects = render_scene(
                _image_rng(seed + 1000, split, i), size, max_objects)
            file_name = f'toy_{split}_{i:05d}.jpg'
            _write_jpg(osp.join(img_dir, file_name), image)
            images.append(
                dict(id=i + 1, file_name=file_name, height=size, width=size))
            for obj in objects:
                annotations.append(
                    _coco_annotation(obj, size,
                                     len(annotations) + 1, i + 1))
        with open(osp.join(root, 'annotations', f'instances_{split}.json'),
                  'w') as f:
            json.dump(
                dict(images=images, annotations=annotations,
                     categories=categories), f, indent=1)
        counts[split] = len(annotations)
    return counts


def make_toy_data(root: str = 'data',
                  kinds: Sequence[str] = ('seg', 'coco'),
                  seed: int = 0,
                  seg_size: int = 64,
                  coco_size: int = 128,
                  num_train: int = 64,
                  num_val: int = 16) -> Dict[str, str]:
    """Write the toy sets under ``root`` (``toy_seg/`` and ``toy_coco/``).

    Args:
        root (str): Parent folder.
        kinds (Sequence[str]): Any of ``'seg'`` and ``'coco'``.
        seed (int): Seed shared by both sets.
        seg_size (int): Image side of the segmentation set.
        coco_size (int): Image side of the COCO set.
        num_train (int): Training images per set.
        num_val (int): Validation images per set.

    Returns:
        dict: Kind to the folder written.
    """
    unknown = set(kinds) - {'seg', 'coco'}
    if unknown:
        raise ValueError(f'unknown toy set(s) {sorted(unknown)}; choose from '
                         "'seg' and 'coco'")
    out: Dict[str, str] = {}
    if 'seg' in kinds:
        out['seg'] = osp.join(root, 'toy_seg')
        make_toy_segmentation(out['seg'], num_train, num_val, seg_size, seed)
    if 'coco' in kinds:
        out['coco'] = osp.join(root, 'toy_coco')
        make_toy_coco(out['coco'], num_train, num_val, coco_size, seed)
    return out
