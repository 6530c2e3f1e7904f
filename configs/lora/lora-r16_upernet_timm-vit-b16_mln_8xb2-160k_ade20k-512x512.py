# LoRA (rank 16, on qkv and W_O) on UperNet + timm ViT-B/16 (MLN), ADE20K 512x512.
_base_ = ['../finetune/upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [
    dict(type='LoRAHook', rank=16, alpha=16, targets=('qkv', 'proj'))
]
