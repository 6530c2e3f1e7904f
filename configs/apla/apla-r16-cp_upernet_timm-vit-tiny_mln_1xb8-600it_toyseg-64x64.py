# APLA rank 16 with activation checkpointing of the ViT blocks, tiny UperNet +
# timm ViT (toy set).
_base_ = ['../finetune/upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [
    dict(type='APLAHook', rank=16, seed=0),
    dict(type='MemoryEfficientHook', checkpoint_blocks=True),
]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
