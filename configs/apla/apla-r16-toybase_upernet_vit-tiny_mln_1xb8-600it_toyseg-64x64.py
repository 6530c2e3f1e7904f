# APLA rank 16 on the tiny UperNet + mmseg ViT, starting from the toy
# "pretrained" backbone file that tools/make_toy_data.py writes (a seeded
# stand-in for real pretrained weights): a base model to export a delta from
# and merge it back into (README, Quickstart).
_base_ = ['./apla-r16_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py']
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint='data/toy_pretrained/vit-tiny_p8_64.pth')))
