# Mask R-CNN + simple FPN with mmseg's VisionTransformer (ViT-B/16) as the
# plain backbone instead of timm's. Weights: pretrain/vit_base_patch16_224.pth
# in mmseg's key layout (timm weights converted with mmseg's
# tools/model_converters/vit2mmseg.py, as for mmseg's own ViT configs); the
# position embedding is resized from 224 to 1024 px when loaded.
_base_ = ['./mask-rcnn_timm-vit-b16_simple-fpn.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmseg.VisionTransformer',
        img_size=(1024, 1024),
        patch_size=16,
        embed_dims=768,
        num_layers=12,
        num_heads=12,
        mlp_ratio=4,
        out_indices=-1,
        qkv_bias=True,
        drop_path_rate=0.1,
        with_cls_token=True,
        output_cls_token=False,
        final_norm=False,
        norm_cfg=dict(type='LN', eps=1e-6),
        act_cfg=dict(type='GELU'),
        interpolate_mode='bicubic',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='pretrain/vit_base_patch16_224.pth')))
