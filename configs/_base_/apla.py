# APLA mixin: the two drop-in lines as a base. Put it in `_base_` next to a
# stock mmseg/mmdet config with a ViT or Swin backbone:
#
#   _base_ = ['mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py',
#             'path/to/apla_mm/configs/_base_/apla.py']
#
# Any optimizer wrapper works (OptimWrapper, AmpOptimWrapper / --amp). For
# the official APLA recipe (no weight decay on biases and 1-D parameters) add
#   optim_wrapper = dict(
#       paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
# to your config. mmengine refuses keys defined by two sibling bases, so a
# base that already sets custom_imports/custom_hooks cannot sit next to this
# mixin: extend its lists in your config instead,
#   custom_imports = dict(imports=_base_.custom_imports.imports + ['apla_mm'],
#                         allow_failed_imports=False)
#   custom_hooks = _base_.custom_hooks + [dict(type='APLAHook', rank=64)]
# or run `tools/train.py CONFIG --apla rank=64` without editing anything.
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=64, seed=0)]
