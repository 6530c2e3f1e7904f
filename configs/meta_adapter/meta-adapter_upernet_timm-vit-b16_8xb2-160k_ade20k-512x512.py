# META-style adapter (apla_mm's METAAdapterViT) around a frozen timm ViT-B/16
# on ADE20K 512x512: UperNet straight on the adapter's 4-level pyramid (no
# MultiLevelNeck); data, schedule, optimizer and heads as in
# finetune/upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py.
# Expects data/ade/ADEChallengeData2016 and the timm weights as a local file.
_base_ = ['../finetune/upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
embed_dims = 768
model = dict(
    backbone=dict(
        _delete_=True,
        type='METAAdapterViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(img_size=512),
        num_interactions=4,  # spans [[0, 2], [3, 5], [6, 8], [9, 11]]
        num_cascades=8,  # MEA width 96; 14.4M adapter parameters
        num_heads=2,  # per MEA: one horizontal, one vertical stripe head
        stripe_width=8,  # 4 stripes per direction on the 32x32 ViT grid
        mlp_ratio=1.0,
        conv_kernel_size=3,
        conv_inplane=64,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='pretrain/vit_base_patch16_224.safetensors')),
    neck=None,
    decode_head=dict(in_channels=[embed_dims] * 4),
    # Level 2 (stride 16) feeds the auxiliary head, as in ViT-Adapter.
    auxiliary_head=dict(in_channels=embed_dims, in_index=2))
