# APLA, rank 64, on UperNet + EVA-02 B/14 (TimmViT), ADE20K (512 crops padded to 518).
_base_ = ['../finetune/upernet_timm-eva02-b14_mln_8xb2-160k_ade20k-518x518.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=64, seed=0)]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
