# Frozen timm backbone: only the neck and heads train.
_base_ = ['./upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py']
model = dict(backbone=dict(frozen=True))
