# META-style adapter (apla_mm's METAAdapterViT) around a frozen timm ViT-B/16,
# Mask R-CNN with a plain FPN on the adapter's 4-level pyramid (as
# ViT-Adapter) instead of the simple feature pyramid; COCO, LSJ 1024x1024,
# AdamW 1x, 16 images per iteration (8 GPUs x 2). Data, schedule, RPN and RoI
# heads as in finetune/mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py.
# Expects data/coco and pretrain/vit_base_patch16_224.safetensors (local).
_base_ = ['../finetune/mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py']
embed_dim = 768
model = dict(
    backbone=dict(
        _delete_=True,
        type='METAAdapterViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(img_size=1024),
        num_interactions=4,  # spans [[0, 2], [3, 5], [6, 8], [9, 11]]
        num_cascades=8,  # MEA width 96
        num_heads=2,
        stripe_width=8,  # 8 stripes per direction on the 64x64 ViT grid
        mlp_ratio=1.0,
        conv_kernel_size=3,
        conv_inplane=64,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen=True,
        with_cp=False,  # True trades compute for activation memory
        init_cfg=dict(
            type='Pretrained',
            checkpoint='pretrain/vit_base_patch16_224.safetensors')),
    neck=dict(
        _delete_=True,
        type='FPN',
        in_channels=[embed_dim] * 4,
        out_channels=256,
        num_outs=5))
