# Frozen backbone: only the neck and heads train (the memory floor of any
# backbone adaptation method).
_base_ = ['./upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py']
model = dict(backbone=dict(frozen_exclude=[]))
