# APLA rank 64 on mmseg's UperNet + ViT-B/16 (MLN), ADE20K 512x512, with every
# memory option (docs/memory.md): lean loss, checkpointed neck/heads, fused
# attention, frozen backbone stored in bf16 under bf16 AMP.
_base_ = [
    './apla-r64_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py',
    '../_base_/memory.py'
]
custom_hooks = [dict(type='APLAHook', rank=64, seed=0), _base_.memory_hook_amp]
# bf16 autocast (on a CPU too; fp16 GPUs: dtype='float16' here and
# frozen_dtype='float16' in the hook)
optim_wrapper = dict(type='PortableAmpOptimWrapper', dtype='bfloat16')
