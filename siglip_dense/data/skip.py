"""``skip_bad``: what happens to a sample whose files fail to load, in training and in evaluation.

A dataset's ``__getitem__`` goes through :func:`load_or_skip`: with ``skip_bad`` a :class:`DataError`
becomes a warning and a *skip marker* naming the sample's file, instead of an item. Then:

- training (:class:`~siglip_dense.data.samplers.PerSampleSeeded`, :func:`substitute`): the marker is
  replaced by a sample drawn uniformly from the whole split by an RNG seeded with the sample's own
  augmentation seed (the first good index of a seeded permutation), as detectron2's
  ``MapDataset.__getitem__`` retries with a random index and MMSeg/MMEngine's
  ``BaseDataset.__getitem__`` with ``_rand_another``. Only the bad index's file is recorded in the
  substitute's ``meta["skipped"]``, so each bad file counts once per epoch and no good sample is drawn
  more often than another (the old "next good one" made the image after a run of bad ones repeat);
- evaluation (:func:`collate_kept`): the marker is dropped from its batch, never replaced by another
  image (which would be scored twice); its file goes into the first kept item's ``meta["skipped"]``.
  Validation files are fully decoded by the scan before training, which removes bad ones from the
  index up front (:func:`drop_samples`); a marker appears only for a file that went bad afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from siglip_dense.data.io import DataError

SKIPPED_KEY = "skipped_file"  # the marker: {SKIPPED_KEY: path of the bad sample's image}


def is_skipped(item: Any) -> bool:
    """Whether ``item`` is a skip marker rather than a sample."""
    return isinstance(item, dict) and SKIPPED_KEY in item


def load_or_skip(dataset: Any, index: int, make: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """``make(index)``; with ``dataset.skip_bad`` a :class:`DataError` is warned about and counted in
    ``dataset.num_skipped``, and a marker ``{SKIPPED_KEY: dataset.sample_file(index)}`` returned.

    Raises:
        DataError: from ``make`` when ``skip_bad`` is false.
    """
    try:
        return make(index)
    except DataError as exc:
        if not getattr(dataset, "skip_bad", False):
            raise
        dataset.num_skipped = getattr(dataset, "num_skipped", 0) + 1
        warnings.warn(
            f"skipped bad sample ({dataset.num_skipped} so far in this process): {exc}", stacklevel=3
        )
        return {SKIPPED_KEY: str(dataset.sample_file(index))}


def substitute(dataset: Any, index: int, seed: int | None, marker: dict[str, Any]) -> dict[str, Any]:
    """A training substitute for the bad sample ``index``: the first good sample of a permutation of
    the split seeded by ``seed`` (the sample's augmentation seed; ``index`` when there is none).

    The first good index of a uniform random permutation is uniform over the good samples, so no
    sample is favoured; the draw depends only on the seed (reproducible across workers and resume).

    Raises:
        DataError: when every sample of the split fails to load.
    """
    rng = np.random.default_rng(index if seed is None else seed)
    for j in rng.permutation(len(dataset)):
        if int(j) == index:
            continue
        item = dataset[int(j)]
        if not is_skipped(item):
            item["meta"]["skipped"] = [marker[SKIPPED_KEY]]
            return item
    raise DataError(f"every sample of {type(dataset).__name__} failed to load (e.g. {marker[SKIPPED_KEY]})")


def collate_kept(items: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]]) -> dict[str, Any]:
    """``collate`` of the evaluation items that loaded; skipped files go to the first kept item's
    ``meta["skipped"]`` (counted by :class:`~siglip_dense.callbacks.SkippedSamples`). When none
    loaded: ``{"meta": [], "skipped": files}``, which evaluation steps pass over."""
    kept = [it for it in items if not is_skipped(it)]
    files = [it[SKIPPED_KEY] for it in items if is_skipped(it)]
    if not kept:  # an empty batch: the task's eval step passes over it, SkippedSamples counts the files
        return {"meta": [], "skipped": files}
    if files:
        kept[0]["meta"]["skipped"] = list(kept[0]["meta"].get("skipped") or ()) + files
    return collate(kept)


def drop_samples(dataset: Any, indices: Sequence[int]) -> list[str]:
    """Remove samples from a dataset's index (``samples`` or COCO ``image_ids``); their files, in order.

    Used by the scan on evaluation splits, so that a bad file is left out of the metric instead of
    being replaced by (and scoring twice) another image.
    """
    drop = set(int(i) for i in indices)
    files = [str(dataset.sample_file(i)) for i in sorted(drop)]
    attr = "samples" if hasattr(dataset, "samples") else "image_ids"
    setattr(dataset, attr, [s for i, s in enumerate(getattr(dataset, attr)) if i not in drop])
    dataset.dropped_files = list(getattr(dataset, "dropped_files", [])) + files
    return files


__all__ = ["SKIPPED_KEY", "collate_kept", "drop_samples", "is_skipped", "load_or_skip", "substitute"]
