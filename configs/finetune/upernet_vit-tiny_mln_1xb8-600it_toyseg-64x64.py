# Full fine-tuning of the tiny UperNet + mmseg ViT on the toy set (CPU, ~2 min).
_base_ = [
    '../_base_/models/upernet_vit-tiny_mln.py',
    '../_base_/datasets/toy_seg.py', 'mmseg::_base_/default_runtime.py',
    '../_base_/schedules/toy_600it.py'
]
