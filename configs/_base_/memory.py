# Memory-options snippet (apla_mm.memory, docs/memory.md). Put it in `_base_`
# and add the hook to your custom_hooks (a sibling base may not define
# custom_hooks too, so the hook dict is a variable here):
#
#   _base_ = ['./apla-r64_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py',
#             '../_base_/memory.py']
#   custom_hooks = [dict(type='APLAHook', rank=64, seed=0),
#                   _base_.memory_hook]            # or _base_.memory_hook_amp
#
# memory_hook: same maths, no AMP needed (APLA, LoRA, frozen or full FT).
memory_hook = dict(
    type='MemoryEfficientHook',
    lean_loss=True,          # keep low-res logits; upsample + loss in backward
    checkpoint_heads=True,   # recompute neck/head regions in backward
    fused_attention=True)    # mmseg ViT attention through SDPA
# memory_hook_amp: also frozen weights stored in bf16 (needs AMP: --amp, or
# optim_wrapper = dict(type='AmpOptimWrapper', dtype='bfloat16')).
memory_hook_amp = dict(memory_hook, frozen_dtype='bfloat16')
