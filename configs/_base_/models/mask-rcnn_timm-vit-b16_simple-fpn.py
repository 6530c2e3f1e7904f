# Mask R-CNN with a plain timm ViT-B/16 and the ViTDet simple feature
# pyramid (Li et al., arXiv 2203.16527), 1024x1024 inputs: mmdet's Mask R-CNN
# with the ResNet/FPN replaced; ViTDet's head changes (2-conv RPN, 4conv1fc
# box head and mask head with LN2d). Unlike ViTDet's ViT, timm's blocks use
# global attention (64x64 tokens at 1024 px) and absolute position embeddings
# resampled from 224 px. Weights are read from a local file only:
#   pretrain/vit_base_patch16_224.safetensors (e.g. timm's
#   vit_base_patch16_224.augreg2_in21k_ft_in1k model.safetensors, or any
#   timm/DeiT/MAE ViT-B/16 .pth/.safetensors; see TimmViT's init_cfg).
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
norm_cfg = dict(type='LN2d', eps=1e-6)
model = dict(
    data_preprocessor=dict(
        pad_size_divisor=32,
        batch_augments=[
            dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)
        ]),
    backbone=dict(
        _delete_=True,
        type='TimmViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(img_size=1024, drop_path_rate=0.1),
        out_indices=(-1, ),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='pretrain/vit_base_patch16_224.safetensors')),
    neck=dict(
        _delete_=True,
        type='SimpleFPN',
        backbone_channel=768,
        in_channels=[192, 384, 768, 768],
        out_channels=256,
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
