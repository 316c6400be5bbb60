"""Input preprocessing a task names (``TaskConfig.preprocess``): contrast enhancement (CLAHE,
ACE) and H&E stain normalisation (Macenko), applied identically wherever a task's images
are read: a site's training and validation sets (fedpacs.client.datacache, the daemon's
data check), the server's held-out set (fedpacs.server.app) and, through
:class:`TaskPreprocessd` in ``configs/inference.json``, an exported MONAI bundle
(fedpacs.common.registry_api.export_bundle), so the researcher's model sees the input it
was trained on.

Array core, dict adapter: :func:`clahe`, :func:`ace` and :func:`macenko` each take one
sample, channels first ``(C, *spatial)``, 2D or 3D, any float range, and return a new
float32 array of the same shape; :func:`apply_steps` chains them in the task's order;
:class:`TaskPreprocess` (one array or tensor) and :class:`TaskPreprocessd` (the keys of a
dict) are the MONAI transforms around it; :func:`preprocessed` maps it over the images of
a data set (masks and labels untouched).

Value ranges. The readers give model inputs in two conventions: MedMNIST and image folders
in [-1, 1] (``(I/255 - 0.5) / 0.5``), NIfTI and PACS volumes z-scored per case
(fedpacs.common.datasets, fedpacs.client.data). The contrast steps work on any range:

- :func:`clahe` and :func:`ace` map the sample to [0, 1] by its own minimum and maximum
  (all channels together, so a colour image keeps its balance), enhance, and map back by
  the same minimum and maximum: the output lies in the input's ``[min, max]`` (CLAHE's
  output spans it exactly: scikit-image stretches its result to [0, 1]), so a [-1, 1]
  image stays in [-1, 1] and a z-scored volume keeps its scale (its mean and variance
  move with the enhancement; no step re-normalises). A constant sample is returned as it
  is.
- :func:`macenko` needs absolute transmitted-light intensity (optical density is
  ``-log(I / Io)``; a min/max stretch would change every stain concentration), so it reads
  an RGB sample in the [-1, 1] convention of the project's colour sources (MedMNIST, image
  folders): ``I = (x + 1) / 2 * 255``, values outside [-1, 1] clipped; its output is in
  [-1, 1] again, on 8-bit steps (torchstain rebuilds an 8-bit RGB image). A task with
  "macenko" must have ``in_channels = 3`` (fedpacs.common.tasks refuses it otherwise).
  An image with too little tissue to estimate stain vectors from (a blank or background
  tile: fewer than :data:`MACENKO_MIN_TISSUE` of its pixels above the optical-density
  threshold, or a degenerate estimate) is returned unchanged and counted in
  :attr:`PreprocessCounts.unchanged` under ``"macenko"``; :func:`preprocessed` logs the
  count for an eagerly processed data set.

Every parameter is a named constant below; changing one changes what a trained model
expects, so they are part of the task's contract and equal at every site.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from fedpacs.common.datasets import SiteData
from fedpacs.common.errors import ConfigError, FieldError
from fedpacs.common.tasks import PREPROCESS_STEPS, TaskConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- parameters
# CLAHE: scikit-image's equalize_adapthist with its documented defaults (contextual regions
# 1/8 of each side, clip limit 0.01 of the region's pixels, 256 bins).
CLAHE_CLIP_LIMIT = 0.01
CLAHE_NBINS = 256
# ACE: local statistics over a window of ACE_WINDOW pixels (voxels) per side; gain
# ACE_ALPHA * global mean / local std, at most ACE_MAX_GAIN.
ACE_WINDOW = 7
ACE_ALPHA = 0.5
ACE_MAX_GAIN = 3.0
ACE_MIN_STD = 1e-6  # a flatter window gets the maximum gain (its x - mean is ~0 anyway)
# Macenko: the reference (target) H&E stain matrix, columns haematoxylin and eosin as
# optical-density unit vectors in RGB, and the reference 99th-percentile stain
# concentrations. These are the values of Macenko's reference implementation
# (github.com/mitkovetta/staining-normalization, normalizeStaining.m, ported to Python in
# github.com/schaugf/HEnorm_python) and the defaults of torchstain's
# NumpyMacenkoNormalizer: a published target, so every site and the researcher normalise to
# the same appearance without sharing any image.
MACENKO_HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_C_REF = (1.9705, 1.0308)
MACENKO_IO = 240.0  # transmitted light intensity (background)
MACENKO_ALPHA = 1.0  # percentile of the stain-vector angles (robust extremes)
MACENKO_BETA = 0.15  # optical density below which a pixel is background (transparent)
MACENKO_MIN_TISSUE = 0.01  # fraction of pixels above MACENKO_BETA needed ...
MACENKO_MIN_TISSUE_PIXELS = 16  # ... and at least this many


@dataclass
class PreprocessCounts:
    """How many images the steps saw, and per step how many it left unchanged (Macenko:
    too little tissue). One object per data set or transform; not shared between
    processes (a DataLoader worker counts in its own copy)."""

    images: int = 0
    unchanged: dict[str, int] = field(default_factory=dict)

    def left(self, step: str) -> None:
        self.unchanged[step] = self.unchanged.get(step, 0) + 1


# --------------------------------------------------------------------------- array core
def _as_sample(img: Any, what: str) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"{what}: expected one sample (C, H, W) or (C, D, H, W), got shape "
                         f"{x.shape}. Fix: pass one channels-first image, not a batch")
    return x


def _to_unit(x: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """``x`` mapped to [0, 1] by its own min/max (float64), with them; None if constant."""
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return None
    return (x.astype(np.float64) - lo) / (hi - lo), lo, hi


def _from_unit(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (lo + np.clip(u, 0.0, 1.0) * (hi - lo)).astype(np.float32)


def clahe(img: NdarrayOrTensor) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (Zuiderveld, "Contrast limited
    adaptive histogram equalization", Graphics Gems IV, 1994) with scikit-image's
    ``equalize_adapthist`` (2D or 3D), on the sample mapped to [0, 1] by its min/max.

    Three channels of a 2D sample are taken as RGB: equalised on the HSV value, as
    scikit-image does for colour images, so hues are kept; any other channel count is
    equalised channel by channel. Returns float32 in the input's [min, max]."""
    from skimage.exposure import equalize_adapthist

    x = _as_sample(img, "clahe")
    unit = _to_unit(x)
    if unit is None:
        return x.copy()
    u, lo, hi = unit
    if x.shape[0] == 3 and x.ndim == 3:
        rgb = equalize_adapthist(np.moveaxis(u, 0, -1), clip_limit=CLAHE_CLIP_LIMIT,
                                 nbins=CLAHE_NBINS)
        return _from_unit(np.moveaxis(rgb, -1, 0), lo, hi)
    # the undecorated function: scikit-image guesses "RGB" from a last axis of 3 or 4,
    # which a grey 3D volume may have
    grey: Callable[..., np.ndarray] = getattr(equalize_adapthist, "__wrapped__",
                                              equalize_adapthist)
    out = np.stack([grey(c, clip_limit=CLAHE_CLIP_LIMIT, nbins=CLAHE_NBINS) for c in u])
    return _from_unit(out, lo, hi)


def ace(img: NdarrayOrTensor) -> np.ndarray:
    """Adaptive contrast enhancement (ACE): local-statistics unsharp masking with a
    contrast gain inversely proportional to the local standard deviation, after Lee
    ("Digital image enhancement and noise filtering by use of local statistics", IEEE
    TPAMI 2(2), 1980) and Narendra & Fitch ("Real-time adaptive contrast enhancement",
    IEEE TPAMI 3(6), 1981), with the gain clipped as in Chang & Wu ("Image contrast
    enhancement based on a histogram transformation of local standard deviation", IEEE
    TMI 17(4), 1998)::

        out(p) = m(p) + G(p) * (x(p) - m(p)),   G(p) = min(alpha * M / s(p), G_max)

    ``m(p)``, ``s(p)``: mean and standard deviation of the ``ACE_WINDOW``-wide window
    around ``p`` (edges reflected), ``M``: the channel's global mean, ``alpha`` =
    :data:`ACE_ALPHA`, ``G_max`` = :data:`ACE_MAX_GAIN`. Per channel, on the sample mapped
    to [0, 1] by its min/max; the result is clipped to [0, 1] and mapped back: float32 in
    the input's [min, max]."""
    from scipy.ndimage import uniform_filter

    x = _as_sample(img, "ace")
    unit = _to_unit(x)
    if unit is None:
        return x.copy()
    u, lo, hi = unit
    out = np.empty_like(u)
    for c, ch in enumerate(u):
        mean = uniform_filter(ch, size=ACE_WINDOW, mode="reflect")
        sq = uniform_filter(ch * ch, size=ACE_WINDOW, mode="reflect")
        std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
        gain = np.full_like(ch, ACE_MAX_GAIN)
        np.divide(ACE_ALPHA * float(ch.mean()), std, out=gain, where=std > ACE_MIN_STD)
        out[c] = mean + np.minimum(gain, ACE_MAX_GAIN) * (ch - mean)
    return _from_unit(out, lo, hi)


class _TooLittleTissue(Exception):
    """The image holds too few stained pixels, or a degenerate stain estimate."""


def _normalise_stains(rgb: np.ndarray) -> np.ndarray:
    """Macenko normalisation of ``rgb`` (H, W, 3) intensities in [0, 255] to the reference
    stains (torchstain); 8-bit values as float."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    od = -np.log((rgb + 1.0) / MACENKO_IO)
    tissue = int(np.all(od >= MACENKO_BETA, axis=-1).sum())  # torchstain's "ODhat" pixels
    if tissue < max(MACENKO_MIN_TISSUE_PIXELS, MACENKO_MIN_TISSUE * od[..., 0].size):
        raise _TooLittleTissue(f"{tissue} stained pixels")
    norm = NumpyMacenkoNormalizer()
    norm.HERef = np.array(MACENKO_HE_REF)
    norm.maxCRef = np.array(MACENKO_MAX_C_REF)
    try:
        with np.errstate(divide="raise", invalid="raise", over="raise"):
            out, _, _ = norm.normalize(I=rgb, Io=MACENKO_IO, alpha=MACENKO_ALPHA,
                                       beta=MACENKO_BETA, stains=False)
    except (FloatingPointError, np.linalg.LinAlgError, ValueError, IndexError) as exc:
        raise _TooLittleTissue(type(exc).__name__) from exc
    return np.asarray(out, dtype=np.float64)


def macenko(img: NdarrayOrTensor, *, counts: PreprocessCounts | None = None) -> np.ndarray:
    """Macenko stain normalisation (Macenko et al., "A method for normalizing histology
    slides for quantitative analysis", ISBI 2009) of an RGB H&E sample ``(3, *spatial)`` in
    [-1, 1] to the reference stains :data:`MACENKO_HE_REF` / :data:`MACENKO_MAX_C_REF`.
    Returns float32 in [-1, 1] (8-bit steps); an image with too little tissue is returned
    unchanged and counted in ``counts``."""
    x = _as_sample(img, "macenko")
    if x.shape[0] != 3:
        raise ValueError(f"macenko: expected an RGB sample with 3 channels, got "
                         f"{x.shape[0]}. Fix: set the task's in_channels = 3, or drop "
                         '"macenko" from task.preprocess')
    spatial = x.shape[1:]
    rgb = np.moveaxis(np.clip((x.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0) * 255.0, 0, -1)
    try:
        out = _normalise_stains(rgb.reshape(-1, spatial[-1], 3))
    except _TooLittleTissue as why:
        log.debug("macenko: image left unchanged (%s)", why)
        if counts is not None:
            counts.left("macenko")
        return x.copy()
    unit = np.moveaxis(out.reshape(*spatial, 3), -1, 0) / 255.0
    return ((unit - 0.5) / 0.5).astype(np.float32)


def _check_steps(steps: Sequence[str]) -> tuple[str, ...]:
    steps = tuple(steps)
    if not all(isinstance(s, str) and s in PREPROCESS_STEPS for s in steps) or \
            len(set(steps)) != len(steps):
        raise ConfigError("preprocessing", [FieldError(
            "task.preprocess", f"a list of distinct steps out of {', '.join(PREPROCESS_STEPS)}",
            repr(list(steps)), 'e.g. preprocess = ["clahe"], or leave it out')])
    return steps


def apply_steps(img: NdarrayOrTensor, steps: Sequence[str], *,
                counts: PreprocessCounts | None = None) -> np.ndarray:
    """``steps`` (out of PREPROCESS_STEPS) applied to one sample in order: float32, the
    input's shape (no steps: the input as float32)."""
    out = _as_sample(img, "preprocess")
    for step in _check_steps(steps):
        if step == "clahe":
            out = clahe(out)
        elif step == "ace":
            out = ace(out)
        else:
            out = macenko(out, counts=counts)
    if counts is not None:
        counts.images += 1
    return out


# --------------------------------------------------------------------------- MONAI transforms
class TaskPreprocess(Transform):
    """The task's preprocessing as a MONAI transform on one sample (numpy array, tensor or
    MetaTensor, channels first); returns the same type (a MetaTensor keeps its meta).
    ``TaskPreprocess(["clahe"])``; :attr:`counts` counts what it saw."""

    def __init__(self, steps: Sequence[str]) -> None:
        self.steps = _check_steps(steps)
        self.counts = PreprocessCounts()

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        src = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img
        out = apply_steps(src, self.steps, counts=self.counts)
        return convert_to_dst_type(out, img, dtype=out.dtype)[0]


class TaskPreprocessd(MapTransform):
    """Dictionary adapter of :class:`TaskPreprocess`: the steps on each of ``keys``
    (images only: never a label or mask key). What an exported bundle's
    ``configs/inference.json`` names as ``fedpacs.common.preprocess.TaskPreprocessd``."""

    def __init__(self, keys: KeysCollection, steps: Sequence[str],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = TaskPreprocess(steps)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]
                 ) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


# --------------------------------------------------------------------------- data sets
IMAGE_KEY = "image"  # the image of a dict sample (fedpacs.common.augment's convention)


def _map_image(item: Any, fn: Callable[[Any], Any]) -> Any:
    """A sample with ``fn`` applied to its image: the first of a tuple/list (image, label
    [, ...]), the "image" of a dict, or a bare image."""
    if isinstance(item, tuple | list):
        return type(item)([fn(item[0]), *item[1:]])
    if isinstance(item, Mapping):
        return {**item, IMAGE_KEY: fn(item[IMAGE_KEY])}
    return fn(item)


class PreprocessedDataset(Dataset[Any]):
    """``base`` with the steps applied to each sample's image when it is read (a data set
    that is not held in memory as one tensor)."""

    def __init__(self, base: Dataset[Any], steps: Sequence[str]) -> None:
        self.base = base
        self.transform = TaskPreprocess(steps)

    @property
    def counts(self) -> PreprocessCounts:
        return self.transform.counts

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return _map_image(self.base[index], self.transform)


class PreprocessedIterable(IterableDataset[Any]):
    """A streaming ``base`` with the steps applied to each sample's image as it streams."""

    def __init__(self, base: IterableDataset[Any], steps: Sequence[str]) -> None:
        self.base = base
        self.transform = TaskPreprocess(steps)

    @property
    def counts(self) -> PreprocessCounts:
        return self.transform.counts

    def __iter__(self) -> Iterator[Any]:
        for item in self.base:
            yield _map_image(item, self.transform)


class PreprocessedReader:
    """A case reader (fedpacs.common.patches.CaseReader) whose case image comes with the
    steps applied to the whole case, before any patch is cut from it: a streamed case is
    enhanced as the whole image a bundle's user feeds to sliding-window inference."""

    def __init__(self, base: Any, steps: Sequence[str]) -> None:
        self.base = base
        self.steps = _check_steps(steps)

    @property
    def case_id(self) -> str:
        return str(self.base.case_id)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.base.read()
        return apply_steps(image, self.steps), label


def _tensor_set(data: TensorDataset, steps: tuple[str, ...],
                counts: PreprocessCounts) -> TensorDataset:
    images, *rest = data.tensors
    if len(images) == 0:
        return data
    out = np.stack([apply_steps(x, steps, counts=counts) for x in images.cpu().numpy()])
    return TensorDataset(torch.from_numpy(out).to(images.dtype), *rest)


def _one_set(data: Dataset[Any], steps: tuple[str, ...], counts: PreprocessCounts
             ) -> Dataset[Any]:
    if isinstance(data, TensorDataset):
        return _tensor_set(data, steps, counts)
    if isinstance(getattr(data, "readers", None), tuple):
        # a set streaming whole cases through readers (fedpacs.common.patches' PatchDataset,
        # CaseDataset): the same set, its readers preprocessing each case
        clone: Any = copy.copy(data)
        clone.readers = tuple(PreprocessedReader(r, steps) for r in clone.readers)
        return clone
    if isinstance(data, IterableDataset):
        return PreprocessedIterable(data, steps)
    return PreprocessedDataset(data, steps)


D = TypeVar("D")


def preprocessed(data: D, task: TaskConfig, *, counts: PreprocessCounts | None = None) -> D:
    """``data`` with ``task.preprocess`` applied to every image (masks and labels as they
    are): a site's :class:`SiteData` (training and validation sets, same class, other
    fields kept), or one data set. A TensorDataset is processed once, now, into a new
    TensorDataset; a set streaming cases through ``readers`` (fedpacs.common.patches) stays
    that set, its readers wrapped (:class:`PreprocessedReader`: the steps on each whole case
    as it is read, before a patch is cut); any other data set lazily, per sample as it is
    read (:class:`PreprocessedDataset`, or :class:`PreprocessedIterable` for an iterable).
    (A wrapper is a Dataset, not an instance of the input's class, despite the annotation.)
    No steps: ``data`` itself. ``counts`` (a new one when None) counts the images processed
    now and the Macenko fallbacks among them, which are also logged."""
    steps = _check_steps(task.preprocess)
    if not steps:
        return data
    counts = counts if counts is not None else PreprocessCounts()
    if isinstance(data, SiteData):
        out: Any = dataclasses.replace(data, train=_one_set(data.train, steps, counts),
                                       val=_one_set(data.val, steps, counts))
    elif isinstance(data, Dataset):
        out = _one_set(data, steps, counts)
    else:
        raise TypeError(f"preprocessed: expected a SiteData or a torch Dataset, got "
                        f"{type(data).__name__}. Fix: pass the data a reader returned")
    for step, n in sorted(counts.unchanged.items()):
        log.warning("preprocessing %s left %d of %d image(s) unchanged (too little tissue to "
                    "estimate stains from)", step, n, counts.images)
    return out
