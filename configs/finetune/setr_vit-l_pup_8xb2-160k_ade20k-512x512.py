# Full fine-tuning: mmseg's SETR-PUP + ViT-L/16 on ADE20K 512x512, with the
# backbone's img_size of APLA's official segmentation config (384x384: the
# position embedding is resized to each input). The rest is mmseg's: SGD with
# momentum 0.9, lr 1e-3, no weight decay, heads at 10x lr, poly 160k, three
# auxiliary SETR-UP heads (loss weight 0.4), slide inference 512/341.
# Expects data/ade/ADEChallengeData2016 and pretrain/vit_large_p16.pth
# (mmseg's converted ImageNet-21k ViT-L, see mmseg's configs/setr/README.md).
_base_ = ['mmseg::setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py']
model = dict(backbone=dict(img_size=(384, 384)))
