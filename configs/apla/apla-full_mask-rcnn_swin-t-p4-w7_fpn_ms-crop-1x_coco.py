# APLA on mmdet's Mask R-CNN + Swin-T, COCO, multi-scale 480-800, AdamW 1x
# (the APLA paper's detection setting): every W_O (weight and bias) of the Swin blocks trains, as in APLA's detection code; the rest of the backbone is
# frozen, neck and heads train. The two APLA lines plus the official no-decay
# recipe for biases and 1-D parameters.
_base_ = ['../finetune/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-1x_coco.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank='full', seed=0)]
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
# mmdet's Swin adds a LayerNorm per output (norm0-norm3) that Microsoft's
# pretrained file does not have; frozen, they keep LayerNorm's identity
# initialisation. The load guard would stop the run without this line.
allow_partial_pretrained = [r'backbone\.norm[0-3]\..*']
