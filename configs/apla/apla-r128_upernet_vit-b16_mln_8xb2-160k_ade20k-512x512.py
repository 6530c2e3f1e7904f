# APLA, rank 128, on mmseg's UperNet + ViT-B/16 (MLN), ADE20K 512x512:
# the full fine-tuning config plus the two APLA lines.
_base_ = ['../finetune/upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=128, seed=0)]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
