"""Dataset mapper with DETR's augmentation, built from detectron2 transforms."""
import copy

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .images import read_image


class DetrDatasetMapper:
    """Reads the image, applies DETR augmentation (train) or the test resize, returns detectron2's
    model input dict (``image`` (3, H, W) uint8 tensor, ``instances`` in training).

    Images are read by :func:`ks_detr.data.images.read_image`: EXIF orientation applied (boxes and
    json width/height refer to the displayed image), grayscale replicated to 3 channels, alpha
    composited onto black, more than 8 bits per sample min-max stretched to 0-255 per image.

    Train: random flip (``INPUT.RANDOM_FLIP``: horizontal, vertical or none), then with probability
    0.5 a resize to one of ``INPUT.CROP.PRE_RESIZE_SIZES`` + ``RandomCrop(INPUT.CROP.TYPE,
    INPUT.CROP.SIZE)``, then the multi-scale ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN,
    INPUT.MAX_SIZE_TRAIN)``.
    """

    def __init__(self, cfg, is_train=True):
        self.is_train = is_train
        self.img_format = cfg.INPUT.FORMAT
        if is_train:
            # as detectron2's build_augmentation: "horizontal" | "vertical" (probability 0.5) | "none"
            flip = [] if cfg.INPUT.RANDOM_FLIP == "none" else [
                T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                             vertical=cfg.INPUT.RANDOM_FLIP == "vertical")]
            resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                          cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
            self.augs = T.AugmentationList(flip + [resize])
            self.crop_augs = None
            if cfg.INPUT.CROP.ENABLED:
                self.crop_augs = T.AugmentationList(flip + [
                    T.ResizeShortestEdge(cfg.INPUT.CROP.PRE_RESIZE_SIZES, sample_style="choice"),
                    T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
                    resize,
                ])
        else:
            self.augs = T.AugmentationList([T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)])
            self.crop_augs = None

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.img_format)
        utils.check_image_size(dataset_dict, image)
        augs = self.augs
        if self.crop_augs is not None and np.random.rand() < 0.5:
            augs = self.crop_augs
        aug_input = T.AugInput(image)
        transforms = augs(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = dataset_dict.pop("annotations", None)
        if not self.is_train:
            return dataset_dict
        annos = [
            utils.transform_instance_annotations(obj, transforms, image.shape[:2])
            for obj in annos or []
            if obj.get("iscrowd", 0) == 0
        ]
        for obj in annos:
            obj.pop("segmentation", None)
            obj.pop("keypoints", None)
        instances = utils.annotations_to_instances(annos, image.shape[:2])
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
