# LoRA (rank 16, on qkv and W_O) on Mask R-CNN + timm ViT-B/16 (SimpleFPN), COCO.
_base_ = ['../finetune/mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [
    dict(type='LoRAHook', rank=16, alpha=16, targets=('qkv', 'proj'))
]
