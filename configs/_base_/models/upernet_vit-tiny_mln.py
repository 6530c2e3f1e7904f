# UperNet on a tiny mmseg VisionTransformer (64-d, 4 layers, patch 8) for the
# toy set: mmseg's UperNet-ViT model with every width scaled down.
_base_ = ['mmseg::_base_/models/upernet_vit-b16_ln_mln.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dims = 64
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(
        img_size=(64, 64),
        patch_size=8,
        embed_dims=embed_dims,
        num_layers=4,
        num_heads=2,
        out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[embed_dims] * 4, out_channels=embed_dims),
    decode_head=dict(
        in_channels=[embed_dims] * 4, channels=64, num_classes=5),
    auxiliary_head=dict(in_channels=embed_dims, channels=32, num_classes=5))
