# Full fine-tuning: mmdet's Mask R-CNN + Swin-T with the multi-scale 480-800
# + DETR-style crop augmentation, AdamW (lr 1e-4, wd 0.05), on a 1x schedule
# (12 epochs, lr steps at 8 and 11): the detection setting of APLA's official
# code (apla_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x).
# mmdet's ms-crop config is 3x; only the schedule changes here. Weights from a
# local file: download swin_tiny_patch4_window7_224.pth (Swin's v1.0.0
# release) to pretrain/.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint='pretrain/swin_tiny_patch4_window7_224.pth')))
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
