# Your own detection / instance segmentation data in COCO format: APLA r64 on
# Mask R-CNN + timm ViT-B/16 + simple FPN, LSJ 1024 (docs/data.md). Images
# under data_root/images/, annotations data_root/annotations/{train,val}.json
# with a polygon (or RLE) mask and a box per object.
_base_ = ['../apla/apla-r64_mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py']
data_root = 'data/my_coco/'
classes = ('cat', 'dog')  # category names of the json, in label order
data = dict(data_root=data_root, metainfo=dict(classes=classes),
            data_prefix=dict(img='images/'))
train_dataloader = dict(
    dataset=dict(data, ann_file='annotations/train.json'))
val_dataloader = dict(dataset=dict(data, ann_file='annotations/val.json'))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
model = dict(roi_head=dict(
    bbox_head=dict(num_classes=len(classes)),
    mask_head=dict(num_classes=len(classes))))
