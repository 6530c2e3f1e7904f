"""Synthetic training batches in each task's data conventions.

Images are random ``uint8`` tensors passed through the model's own data
preprocessor (normalisation, padding, ``batch_input_shape``), exactly as a
dataloader batch would be; labels are random but valid:

* ``seg``: ``SegDataSample`` with a ``gt_sem_seg`` map of random classes;
* ``det``: ``DetDataSample`` with ``gt_instances`` (4 boxes per image of
  1/8 to 1/2 of the image side, labels, box-shaped ``BitmapMasks``);
* ``backbone``: already-normalised ``N(0, 1)`` images and class labels.

Everything is drawn from a generator seeded with ``seed``, so every method
of a run trains on the same batch.
"""
from typing import Any, List, Tuple

import numpy as np
import torch


def _num_classes(cfg, task: str) -> int:
    model = cfg.model
    if task == 'seg':
        return int(model.decode_head.num_classes)
    if task == 'det':
        bbox_head = model.roi_head.bbox_head
        if isinstance(bbox_head, (list, tuple)):
            bbox_head = bbox_head[-1]
        return int(bbox_head.num_classes)
    return int(model.get('num_classes', 1000))


def _images(batch: int, size: int, g: torch.Generator) -> List[torch.Tensor]:
    return [
        torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        for _ in range(batch)
    ]


def _square_meta(size: int) -> dict:
    """Meta information of an unscaled, unflipped ``size x size`` image."""
    return dict(img_shape=(size, size), ori_shape=(size, size),
                pad_shape=(size, size), scale_factor=(1.0, 1.0), flip=False)


def seg_samples(batch: int, size: int, num_classes: int,
                g: torch.Generator) -> list:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    out = []
    for _ in range(batch):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, num_classes, (1, size, size), generator=g))
        sample.set_metainfo(_square_meta(size))
        out.append(sample)
    return out


def det_samples(batch: int, size: int, num_classes: int, g: torch.Generator,
                num_objects: int = 4) -> list:
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    out = []
    for _ in range(batch):
        wh = (torch.rand(num_objects, 2, generator=g) * 0.375 + 0.125) * size
        xy = torch.rand(num_objects, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1).floor()
        masks = np.zeros((num_objects, size, size), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        sample = DetDataSample()
        sample.gt_instances = InstanceData(
            bboxes=boxes,
            labels=torch.randint(0, num_classes, (num_objects, ),
                                 generator=g),
            masks=BitmapMasks(masks, size, size))
        sample.set_metainfo(_square_meta(size))
        out.append(sample)
    return out


def make_batch(task: str, model: torch.nn.Module, cfg, size: int,
               batch: int, seed: int = 0) -> Tuple[torch.Tensor, Any]:
    """``(inputs, data_samples)`` for ``model(inputs, data_samples,
    mode='loss')``, on the model's device, after its data preprocessor."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if task == 'backbone':
        # random 8-bit images, centred: torch 2.1's fake mode cannot draw
        # normal samples from a generator (``torch._refs.normal`` asserts)
        inputs = (torch.randint(0, 256, (batch, 3, size, size),
                                generator=g).float() - 127.5) / 64.0
        labels = torch.randint(0, _num_classes(cfg, task), (batch, ),
                               generator=g)
        return inputs.to(device), labels.to(device)
    num_classes = _num_classes(cfg, task)
    if task == 'seg':
        samples = seg_samples(batch, size, num_classes, g)
    elif task == 'det':
        samples = det_samples(batch, size, num_classes, g)
    else:
        raise ValueError(f'unknown task {task!r}')
    data = model.data_preprocessor(
        dict(inputs=_images(batch, size, g), data_samples=samples), True)
    return data['inputs'], data['data_samples']
