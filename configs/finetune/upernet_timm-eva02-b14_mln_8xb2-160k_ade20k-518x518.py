# Full fine-tuning: UperNet + EVA-02 B/14 (timm 'eva02_base_patch14_224',
# patch 14) through TimmViT on ADE20K: the DINOv2 ViT-B/14 config with another
# backbone. As there, the 512x512 training crops are padded to 518x518 (37x37
# patches; padded pixels carry the ignore label 255), test images are padded
# to a multiple of 14 and slide inference uses 518x518 windows. Expects
# data/ade/ADEChallengeData2016 and the weights as a local file,
# pretrain/eva02_base_patch14_224.mint_in22k.safetensors.
_base_ = ['./upernet_timm-dinov2-vit-b14_mln_8xb2-160k_ade20k-518x518.py']
model = dict(
    backbone=dict(
        model_name='eva02_base_patch14_224',
        init_cfg=dict(
            checkpoint='pretrain/eva02_base_patch14_224.mint_in22k.safetensors'
        )))
