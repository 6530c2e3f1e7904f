# LoRA (rank 8, on qkv and W_O) on the tiny Mask R-CNN + timm ViT (toy COCO).
_base_ = [
    '../finetune/mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco-128x128.py'
]
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [
    dict(type='LoRAHook', rank=8, alpha=16, targets=('qkv', 'proj'))
]
