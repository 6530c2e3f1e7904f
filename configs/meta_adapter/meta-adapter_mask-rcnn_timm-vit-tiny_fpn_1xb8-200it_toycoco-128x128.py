# META-style adapter (apla_mm's METAAdapterViT) around the tiny timm ViT of
# the toy detection configs (frozen, random init), Mask R-CNN with a plain FPN
# on the adapter's 4-level pyramid instead of the simple feature pyramid.
# Same data, schedule and heads as
# finetune/mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco-128x128.py.
_base_ = [
    '../finetune/mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco-'
    '128x128.py'
]
embed_dim = 96
channels = 64
model = dict(
    backbone=dict(
        _delete_=True,
        type='METAAdapterViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(
            img_size=128,
            patch_size=16,
            embed_dim=embed_dim,
            depth=4,
            num_heads=3),
        num_interactions=4,  # one ViT block per stage
        num_cascades=2,  # MEA width 48
        num_heads=2,
        stripe_width=2,  # 4 stripes per direction on the 8x8 ViT grid
        mlp_ratio=1.0,
        conv_inplane=16,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen=True),
    neck=dict(
        _delete_=True,
        type='FPN',
        in_channels=[embed_dim] * 4,
        out_channels=channels,
        num_outs=5))
