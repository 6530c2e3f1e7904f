# APLA mixin. Put it in `_base_` next to an mmseg/mmdet config with a ViT
# backbone and switch the optimizer wrapper in your config:
#
#   _base_ = ['mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py',
#             'path/to/apla_mm/configs/_base_/apla.py']
#   optim_wrapper = dict(type='APLAOptimWrapper')
#
# (mmengine refuses keys defined by two sibling bases, so a base that already
# sets custom_imports/custom_hooks cannot sit next to this mixin: add these
# lines to the config itself instead, as the configs in configs/apla/ do.)
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=64, seed=0)]
