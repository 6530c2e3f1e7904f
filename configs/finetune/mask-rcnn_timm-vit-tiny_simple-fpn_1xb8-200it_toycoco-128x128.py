# Full fine-tuning of Mask R-CNN + tiny timm ViT (random init) + simple FPN on
# the toy COCO set, CPU, ~4 min with bbox/segm evaluation at the end:
#   python tools/make_toy_data.py --out data --kinds coco
#   python tools/train.py THIS_FILE
_base_ = [
    '../_base_/models/mask-rcnn_timm-vit-tiny_simple-fpn.py',
    '../_base_/datasets/toy_coco_instance.py',
    'mmdet::_base_/default_runtime.py', '../_base_/schedules/toy-det_200it.py'
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=100,
        max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
