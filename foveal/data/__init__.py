"""Datasets, image I/O and synthetic data generators (no downloads).

On-disk evaluation datasets (:func:`foveal.data.datasets.open_dataset`, kinds ``imagenet``,
``imagenet-seg``, ``voc``, ``polyp``, ``folder``; layouts in ``docs/datasets.md``) share one item
contract (:mod:`foveal.data.items`): ``dataset[i]`` is a dict with

* ``"image"``: float (3, H, W), normalised with ``mean``/``std`` (ImageNet's by default);
* ``"id"``: str unique within the dataset (file stem, VOC id, zero-padded ``.mat`` index);
* ``"index"``: int ``i``;
* ``"label"``: int class index (single-label), -1 when unknown;
* ``"original_size"``: (H, W) of the stored image;
* where known, ``"labels"``: float (K,) multi-hot (VOC: K = 20, background excluded) and
  ``"mask"``: int64 (H, W), 255 = ignore (ImageNet-segmentation and polyps {0, 1}, VOC 0..20).

Every such dataset takes ``size`` (int, (H, W) or None = stored size), ``resize``
(``"resize"``: straight to H x W; ``"resize-crop"``: short side to size / ``crop_pct`` (0.875)
then centre crop; ``"none"``), ``mean`` and ``std``; masks follow the image geometry with
nearest interpolation. Images stream from disk (``__init__`` reads file lists and label tables
only). Batch with ``DataLoader(ds, batch_size, collate_fn=foveal.data.items.collate)``.
:mod:`foveal.data.fixtures` writes tiny copies of every layout for tests.
"""
