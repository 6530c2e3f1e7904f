# Full fine-tuning: UperNet + timm ViT-B/16 (MLN) on ADE20K, 512x512: mmseg's
# recipe (./upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py) with apla_mm's
# TimmViT as backbone. Expects data/ade/ADEChallengeData2016 and the timm
# weights as a local file, pretrain/vit_base_patch16_224.safetensors (which
# files fit: configs/_base_/models/mask-rcnn_timm-vit-b16_simple-fpn.py).
_base_ = ['./upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='TimmViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(img_size=512),
        out_indices=(2, 5, 8, 11),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='pretrain/vit_base_patch16_224.safetensors')))
