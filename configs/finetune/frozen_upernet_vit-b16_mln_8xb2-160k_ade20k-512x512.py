# Frozen ViT-B/16 backbone on ADE20K: only the MLN neck and heads train.
_base_ = ['./upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py']
model = dict(backbone=dict(frozen_exclude=[]))
