# APLA rank 64 with activation checkpointing of the ViT blocks (less memory,
# one more backbone forward in backward) on UperNet + timm ViT-B/16, ADE20K.
_base_ = ['../finetune/upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [
    dict(type='APLAHook', rank=64, seed=0),
    dict(type='MemoryEfficientHook', checkpoint_blocks=True),
]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
