# The APLA mixin on mmseg's stock config: identical to
# apla-r64_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py.
_base_ = [
    'mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py',
    '../_base_/apla.py'
]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
