# The APLA mixin on mmseg's stock config: identical to
# apla-r64_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py.
_base_ = [
    'mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py',
    '../_base_/apla.py'
]
optim_wrapper = dict(type='APLAOptimWrapper')
