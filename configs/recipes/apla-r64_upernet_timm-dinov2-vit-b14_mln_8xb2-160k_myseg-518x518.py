# Your own semantic segmentation data: APLA r64 on UperNet + DINOv2 ViT-B/14
# (docs/data.md). Images data_root/images/{train,val}/NAME.jpg, masks
# data_root/masks/{train,val}/NAME.png holding one value per pixel: 0 = void
# (ignored: reduce_zero_label maps it to 255), 1..N = the classes below.
_base_ = ['../apla/apla-r64_upernet_timm-dinov2-vit-b14_mln_8xb2-160k_ade20k-518x518.py']
data_root = 'data/my_seg'
classes = ('road', 'building', 'vegetation')  # mask values 1, 2, 3
data = dict(type='BaseSegDataset', data_root=data_root, metainfo=dict(classes=classes),
            img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(dataset=dict(
    data, data_prefix=dict(img_path='images/train', seg_map_path='masks/train')))
val_dataloader = dict(dataset=dict(
    data, data_prefix=dict(img_path='images/val', seg_map_path='masks/val')))
test_dataloader = val_dataloader
# Patch 14: the 512x512 crops are padded to 518x518 (37x37 patches, padding
# labelled 255 = ignored), test images to a multiple of 14.
model = dict(
    data_preprocessor=dict(size=(518, 518), test_cfg=dict(size_divisor=14)),
    decode_head=dict(num_classes=len(classes)),
    auxiliary_head=dict(num_classes=len(classes)))
