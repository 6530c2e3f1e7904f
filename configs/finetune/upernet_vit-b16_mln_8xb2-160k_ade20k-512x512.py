# Full fine-tuning: mmseg's own UperNet + ViT-B/16 (MLN) on ADE20K, unchanged.
# Expects data/ade/ADEChallengeData2016 and pretrain/vit_base_patch16_224.pth
# (mmseg's converted timm weights, see mmseg's configs/vit/README.md).
_base_ = ['mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py']
