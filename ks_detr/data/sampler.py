"""Resumable training data: the batches of a run are a function of (seed, rank, world size) only.

detectron2's ``TrainingSampler`` + ``AspectRatioGroupedDataset`` restart their stream on
``--resume`` and draw augmentations from each worker's RNG, so a resumed run sees other images with
other augmentations. Here the stream of batches is computed at the index level (no image is read to
skip one) and every sample carries its own augmentation seed:

- global stream: one permutation of the dataset per epoch, from ``(seed, epoch)`` (with repeat
  factors: each index repeated by a stochastic rounding of its factor, as
  ``RepeatFactorTrainingSampler``); position ``p`` of it gets the augmentation seed ``(seed, p)``;
- process ``rank`` of ``world`` takes positions ``rank, rank + world, ...`` and, with aspect-ratio
  grouping, groups them by ``width > height`` into batches in stream order;
- batch ``i`` of a process is the same whatever iteration the run (re)starts at.
"""
import itertools
import logging

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations, trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

from ..errors import ConfigError, DatasetError

SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")


def mix_seed(*words):
    """A 31-bit seed from non-negative integers (numpy's SeedSequence hash: distinct tuples give
    independent seeds)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0] & 0x7FFFFFFF)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of ``(dataset index, augmentation seed)`` for this process.

    Args:
        aspect_groups: (N,) int group of every dataset record (0: width > height, 1: else), or None
            for no grouping.
        repeat_factors: (N,) float repeat factor per record, or None (each record once per epoch).
    Call :meth:`set_start` before iterating to choose the run seed and the first iteration.
    """

    def __init__(self, size, batch_size, aspect_groups=None, repeat_factors=None, shuffle=True,
                 rank=None, world_size=None):
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.aspect_groups = aspect_groups
        self.repeat_factors = None if repeat_factors is None else torch.as_tensor(repeat_factors, dtype=torch.float64)
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.seed, self.start_iter = 0, 0

    def set_start(self, seed, start_iter):
        """Stream of run ``seed``, starting at this process's batch ``start_iter``."""
        self.seed, self.start_iter = int(seed), int(start_iter)

    def _epoch(self, epoch):
        """Dataset indices of one epoch of the global stream."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0, epoch))
        if self.repeat_factors is None:
            indices = torch.arange(self.size)
        else:
            whole = self.repeat_factors.floor()
            reps = whole + (torch.rand(self.size, generator=g, dtype=torch.float64) < self.repeat_factors - whole)
            indices = torch.repeat_interleave(torch.arange(self.size), reps.long())
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        return indices.tolist()

    def _positions(self):
        """(global position, dataset index) of this process's share of the global stream."""
        stream = (idx for epoch in itertools.count() for idx in self._epoch(epoch))
        return itertools.islice(enumerate(stream), self.rank, None, self.world_size)

    def __iter__(self):
        buckets = {}
        produced = 0
        for pos, idx in self._positions():
            group = 0 if self.aspect_groups is None else int(self.aspect_groups[idx])
            bucket = buckets.setdefault(group, [])
            bucket.append((pos, idx))
            if len(bucket) < self.batch_size:
                continue
            if produced >= self.start_iter:
                yield [(i, mix_seed(self.seed, 1, p)) for p, i in bucket]
            produced += 1
            buckets[group] = []


class SeededMapDataset(torch.utils.data.Dataset):
    """``dataset[(index, seed)]`` = ``mapper(records[index])`` with numpy's global RNG (which
    detectron2's augmentations and our mapper draw from) seeded by ``seed`` for that call only."""

    def __init__(self, records, mapper):
        self.records = DatasetFromList(records, copy=False, serialize=True)
        self.mapper = mapper

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, seed = key
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            return self.mapper(self.records[index])
        finally:
            np.random.set_state(state)


def build_resumable_train_loader(cfg, mapper):
    """Train loader of ``cfg.DATASETS.TRAIN`` with this process's share of ``SOLVER.IMS_PER_BATCH``
    (detectron2's dataset dicts, filtering, sampler choice and aspect-ratio grouping). Its
    ``batch_sampler`` is a :class:`ResumableBatchSampler`."""
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world:
        raise ConfigError(f"Invalid config SOLVER.IMS_PER_BATCH={total}: must be divisible by the number of "
                         f"processes ({world})")
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in SAMPLERS:
        raise ConfigError(f"Invalid config DATALOADER.SAMPLER_TRAIN={name!r}: choose one of {SAMPLERS}")
    records = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        n = len(records)
        records = filter_images_with_only_crowd_annotations(records)
        if not records:
            raise DatasetError(
                f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: none of its {n} images has a box (boxes of zero size "
                "or outside the image are dropped, crowd boxes are ignored), so there is nothing to learn; check the "
                "annotations, or set DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on them as background")
    factors = None
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            records, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
    groups = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        if all("width" in r and "height" in r for r in records):
            groups = np.array([0 if r["width"] > r["height"] else 1 for r in records], dtype=np.uint8)
        else:
            logging.getLogger(__name__).warning(
                "DATALOADER.ASPECT_RATIO_GROUPING: some records have no width/height; batches are not grouped")
    sampler = ResumableBatchSampler(len(records), total // world, groups, factors)
    return torch.utils.data.DataLoader(
        SeededMapDataset(records, mapper), batch_sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
        generator=torch.Generator())  # its iterator's base-seed draw must not consume the global RNG
