# APLA on SETR-PUP + ViT-L/16, ADE20K 512x512 (the APLA paper's segmentation
# setting): 256 of each W_O's 1024 output channels train; the rest of the backbone is frozen, the heads train.
_base_ = ['../finetune/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=256, seed=0)]
# The official APLA recipe: biases and 1-D parameters without weight decay
# (the SETR recipe has no weight decay at all; kept for when you add some).
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
