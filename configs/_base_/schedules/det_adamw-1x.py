# 1x detection schedule (12 epochs, steps at 8 and 11) with AdamW as for
# plain-ViT detectors (ViTDet; APLA's detection runs: AdamW, 1x): lr 1e-4 for
# 16 images per iteration (8 GPUs x 2), no weight decay on norms, position
# embedding and class token.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.)
        }))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=12,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# tools/train.py --auto-scale-lr scales lr to the actual total batch size.
auto_scale_lr = dict(enable=False, base_batch_size=16)
