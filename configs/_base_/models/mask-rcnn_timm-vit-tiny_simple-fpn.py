# Mask R-CNN with a tiny plain timm ViT (96-d, 4 blocks, patch 16) and the
# ViTDet simple feature pyramid, shrunk for the 128x128 toy COCO set (objects
# ~30-56 px): narrow neck/heads, fewer sampled RoIs and proposals.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
embed_dim = 96
channels = 64
norm_cfg = dict(type='LN2d', eps=1e-6)
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='TimmViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(
            img_size=128, patch_size=16, embed_dim=embed_dim, depth=4,
            num_heads=3),
        out_indices=(-1, )),
    neck=dict(
        _delete_=True,
        type='SimpleFPN',
        backbone_channel=embed_dim,
        out_channels=channels,
        num_outs=5,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        norm_cfg=norm_cfg),
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        anchor_generator=dict(
            scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2),
            out_channels=channels,
            finest_scale=28),
        bbox_head=dict(
            in_channels=channels, fc_out_channels=256, num_classes=4),
        mask_roi_extractor=dict(
            roi_layer=dict(sampling_ratio=2),
            out_channels=channels,
            finest_scale=28),
        mask_head=dict(
            num_convs=2,
            in_channels=channels,
            conv_out_channels=channels,
            norm_cfg=norm_cfg,
            num_classes=4)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))
