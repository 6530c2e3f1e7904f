# The same tiny UperNet with the timm ViT backbone (apla_mm's TimmViT).
_base_ = ['./upernet_vit-tiny_mln.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmViT',
        model_name='vit_base_patch16_224',
        model_kwargs=dict(
            img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2),
        out_indices=(0, 1, 2, 3)))
