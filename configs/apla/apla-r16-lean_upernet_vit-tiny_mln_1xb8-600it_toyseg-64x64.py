# The toy APLA run with every memory option (docs/memory.md) under bf16 AMP.
_base_ = [
    './apla-r16_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
    '../_base_/memory.py'
]
custom_hooks = [dict(type='APLAHook', rank=16, seed=0), _base_.memory_hook_amp]
optim_wrapper = dict(type='PortableAmpOptimWrapper', dtype='bfloat16')
