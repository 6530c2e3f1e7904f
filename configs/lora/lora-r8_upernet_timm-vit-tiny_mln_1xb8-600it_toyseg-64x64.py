# LoRA (rank 8, on qkv and W_O) on the tiny UperNet + timm ViT (toy set).
_base_ = ['../finetune/upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [
    dict(type='LoRAHook', rank=8, alpha=16, targets=('qkv', 'proj'))
]
