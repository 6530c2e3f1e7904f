# The tiny toy Mask R-CNN with mmseg's VisionTransformer as the plain ViT
# (same size: 96-d, 4 layers, 3 heads, patch 16). mmseg's registry is a
# sibling of mmdet's, so the type is scoped: 'mmseg.VisionTransformer'. Its
# W_O is layers.N.attn.attn.out_proj (inside nn.MultiheadAttention), which
# APLAHook finds automatically.
_base_ = ['./mask-rcnn_timm-vit-tiny_simple-fpn.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmseg.VisionTransformer',
        img_size=(128, 128),
        patch_size=16,
        embed_dims=96,
        num_layers=4,
        num_heads=3,
        mlp_ratio=4,
        out_indices=-1,
        qkv_bias=True,
        with_cls_token=True,
        output_cls_token=False,
        final_norm=False,
        norm_cfg=dict(type='LN', eps=1e-6),
        act_cfg=dict(type='GELU'),
        interpolate_mode='bicubic'))
