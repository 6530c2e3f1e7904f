# Full fine-tuning: UperNet + DINOv2 ViT-B/14 (timm 'vit_base_patch14_dinov2', patch 14) through TimmViT on
# ADE20K. Patch-14 models need inputs that are a multiple of 14: the 512x512
# training crops are padded to 518x518 (37x37 patches; the padded pixels
# carry the ignore label 255), test images are padded to a multiple of 14 and
# slide inference uses 518x518 windows. Expects data/ade/ADEChallengeData2016
# and the weights as a local file, pretrain/dinov2_vitb14_pretrain.pth
# (timm's checkpoint filter converts the original key names).
_base_ = ['./upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py']
model = dict(
    data_preprocessor=dict(size=(518, 518), test_cfg=dict(size_divisor=14)),
    backbone=dict(
        model_name='vit_base_patch14_dinov2',
        model_kwargs=dict(img_size=518),
        init_cfg=dict(checkpoint='pretrain/dinov2_vitb14_pretrain.pth')),
    test_cfg=dict(mode='slide', crop_size=(518, 518), stride=(341, 341)))
