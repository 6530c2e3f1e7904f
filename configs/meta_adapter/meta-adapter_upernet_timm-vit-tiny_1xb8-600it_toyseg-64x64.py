# META-style adapter (apla_mm's METAAdapterViT) around the tiny timm ViT of
# the toy configs, frozen ViT (only the adapter and the heads train), UperNet
# straight on the adapter's 4-level pyramid (no MultiLevelNeck). Same data,
# schedule and heads as finetune/upernet_timm-vit-tiny_mln_1xb8-600it_toyseg.
_base_ = [
    '../_base_/models/upernet_timm-vit-tiny_mln.py',
    '../_base_/datasets/toy_seg.py', 'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/toy_600it.py'
]
embed_dims = 64
model = dict(
    backbone=dict(
        _delete_=True,
        type='METAAdapterViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(
            img_size=64,
            patch_size=8,
            embed_dim=embed_dims,
            depth=4,
            num_heads=2),
        num_interactions=4,  # one ViT block per stage
        num_cascades=2,  # MEA width 32
        num_heads=2,
        stripe_width=2,  # 4 stripes per direction on the 8x8 ViT grid
        mlp_ratio=1.0,
        conv_inplane=16,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen=True),
    neck=None,
    # Level 2 (stride 16) feeds the auxiliary head, as in ViT-Adapter.
    auxiliary_head=dict(in_index=2))
