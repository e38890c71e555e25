"""Decode one DICOM image into model-ready pixels.

The display pipeline follows DICOM PS3.4 Annex N: stored values -> Modality LUT
(Rescale Slope/Intercept or a Modality LUT Sequence) -> VOI LUT Sequence or Window
Center/Width -> ``[0, 1]``; MONOCHROME1 is inverted so that bright always means
dense. Colour images (RGB, YBR converted by pydicom, PALETTE COLOR) keep three
channels. Every function returns ``float32`` arrays shaped ``(F, C, H, W)``.
"""

from __future__ import annotations

import logging
import re
from os import PathLike
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

logger = logging.getLogger(__name__)

Frames = Literal["first", "middle", "all"]
"""Which frames of a multi-frame image become samples."""

Normalize = Literal["auto", "range", "minmax"]
"""How display values are scaled to ``[0, 1]`` (see :func:`read_image`)."""

GRAY_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
SUPPORTED_PHOTOMETRICS = GRAY_PHOTOMETRICS | COLOR_PHOTOMETRICS

_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "pillow", "gdcm")
_PYPI_NAMES = {"gdcm": "python-gdcm"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decoder_problem(transfer_syntax: str) -> str | None:
    """Say why pixel data in ``transfer_syntax`` cannot be decoded here, if it cannot.

    Args:
        transfer_syntax: A Transfer Syntax UID.

    Returns:
        ``None`` when pydicom has a usable decoder (always for native syntaxes),
        otherwise a message naming the packages that would decode it, taken from
        pydicom's decoder plugin registry (e.g. ``pip install pylibjpeg
        pylibjpeg-openjpeg`` for JPEG 2000).

    Raises:
        NotImplementedError: pydicom knows no decoder for this syntax at all.
    """
    uid = UID(transfer_syntax)
    decoder = get_decoder(uid)
    if decoder.is_available:
        return None
    hint = install_hint(uid) or "install a pydicom decoding plugin"
    others = "; ".join(decoder.missing_dependencies) or "no plugin registered"
    return f"{uid.name} ({uid}) has no installed decoder: {hint} (pydicom plugins: {others})"


def install_hint(transfer_syntax: str) -> str:
    """Return ``"pip install ..."`` for the preferred missing decoder plugin of a syntax, or ``""``.

    Args:
        transfer_syntax: A Transfer Syntax UID.

    Returns:
        The command, from pydicom's plugin dependency lists (``pylibjpeg`` preferred,
        then ``pyjpegls``, ``pillow``, ``gdcm``); ``""`` when every plugin is
        installed or the syntax is unknown to pydicom.
    """
    try:
        missing = get_decoder(UID(transfer_syntax)).missing_dependencies
    except NotImplementedError:
        return ""
    plugins = {line.split(" - ", 1)[0]: line for line in missing}
    choice = next((p for p in _PLUGIN_PREFERENCE if p in plugins), next(iter(plugins), ""))
    packages = _requirement_names(plugins.get(choice, ""))
    return f"pip install {' '.join(packages)}" if packages else ""


def _requirement_names(line: str) -> list[str]:
    """``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"`` -> PyPI names."""
    if "requires" not in line:
        return []
    reqs = re.split(r",\s*|\s+and\s+", line.split("requires", 1)[1].strip())
    names = [re.split(r"[<>=!~\s]", req.strip(), maxsplit=1)[0] for req in reqs]
    return [_PYPI_NAMES.get(n, n) for n in names if n and n != "numpy"]


def frame_indices(num_frames: int, frames: Frames) -> list[int]:
    """Return the frame indices a setting selects from an image with ``num_frames`` frames."""
    num_frames = max(1, int(num_frames))
    if frames == "first":
        return [0]
    if frames == "middle":
        return [num_frames // 2]
    if frames == "all":
        return list(range(num_frames))
    raise ValueError(f"frames must be 'first', 'middle' or 'all', got {frames!r}")


def read_image(
    path: str | PathLike[str],
    *,
    frames: Frames = "first",
    num_frames: int | None = None,
    transfer_syntax: str | None = None,
    normalize: Normalize = "auto",
) -> np.ndarray:
    """Decode a DICOM file and map it to display values in ``[0, 1]``.

    Args:
        path: The DICOM file.
        frames: ``"first"``, ``"middle"`` or ``"all"`` frames of a multi-frame image.
        num_frames: Number of frames, when known (from the index); read from the
            header otherwise (only needed for ``"middle"``).
        transfer_syntax: The file's Transfer Syntax UID, when known (from the index);
            read from the header otherwise.
        normalize: ``"auto"``: the VOI output range when a VOI LUT or window is
            present, else per-frame min-max when values are rescaled (a non-identity
            Rescale Slope/Intercept or Modality LUT, e.g. CT Hounsfield units), else
            the stored bit range (8-bit ``v`` -> ``v/255``);
            ``"range"``: always the nominal output range; ``"minmax"``: per frame.

    Returns:
        ``float32`` array ``(F, C, H, W)``, ``C`` 1 for grayscale and 3 for colour.

    Raises:
        Exception: Whatever pydicom raises for unreadable or undecodable pixel data;
            callers quarantine the file.
    """
    if transfer_syntax is None or (frames == "middle" and num_frames is None):
        header = dcmread(path, stop_before_pixels=True)
        transfer_syntax = str(getattr(header, "file_meta", {}).get("TransferSyntaxUID", ""))
        num_frames = int(header.get("NumberOfFrames", 1) or 1)
    index = None if frames == "all" else frame_indices(num_frames or 1, frames)[0]
    ds = Dataset()
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            raise ValueError("deflated dataset")  # zlib-compressed as a whole: no frame-wise reading
        arr = pixel_array(path, index=index, ds_out=ds)  # reads only the pixel module and the frame
    except Exception as exc:  # noqa: BLE001 - retry through the full (more lenient) parser
        logger.debug("frame-wise read of %s failed (%s); reading the whole dataset", path, exc)
        ds = dcmread(path)
        arr = pixel_array(ds, index=index)
    return to_display(arr, ds, normalize=normalize)


def to_display(arr: np.ndarray, ds: Dataset, *, normalize: Normalize = "auto") -> np.ndarray:
    """Map decoded stored values to ``[0, 1]`` display values, ``(F, C, H, W)`` float32.

    Args:
        arr: Output of ``pydicom.pixels.pixel_array`` for ``ds``: ``(H, W)``,
            ``(F, H, W)``, ``(H, W, 3)`` or ``(F, H, W, 3)``.
        ds: The dataset's image pixel module (group 0028) elements.
        normalize: See :func:`read_image`.

    Returns:
        The image(s) scaled to ``[0, 1]``.

    Raises:
        ValueError: Unsupported photometric interpretation.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    arr = np.asarray(arr)
    frame_ndim = 2 if samples == 1 else 3
    if arr.ndim == frame_ndim:
        arr = arr[None]
    if photometric in GRAY_PHOTOMETRICS and samples == 1:
        out = _gray_to_unit(arr, ds, normalize)[:, None]
    elif photometric == "PALETTE COLOR" and samples == 1:
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        out = _scale(rgb.astype(np.float64), 0.0, float(2 ** (8 if bits <= 8 else 16) - 1), normalize)
        out = out.transpose(0, 3, 1, 2)
    elif photometric in COLOR_PHOTOMETRICS and samples == 3:
        lo, hi = _stored_range(ds)
        out = _scale(arr.astype(np.float64), lo, hi, normalize).transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"unsupported PhotometricInterpretation {photometric!r} with {samples} samples/pixel")
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Nominal range of the Modality LUT output (PS3.3 C.11.1)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    lo, hi = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def _voi_kind(ds: Dataset) -> str | None:
    """Which VOI transform applies, as ``apply_voi_lut(prefer_lut=True)`` decides."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _apply_voi(values: np.ndarray, ds: Dataset, kind: str) -> tuple[np.ndarray, float, float]:
    """Apply the VOI LUT or window; return the result and its output range."""
    if kind == "lut":
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
        lut = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
        ints = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        return apply_voi(ints, ds).astype(np.float64), float(lut.min()), float(lut.max())
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
    return apply_windowing(values, ds), float(ends[0]), float(ends[1])


def _gray_to_unit(arr: np.ndarray, ds: Dataset, normalize: Normalize) -> np.ndarray:
    values = apply_modality_lut(arr, ds)
    rescaled = bool(ds.get("ModalityLUTSequence")) or (
        "RescaleSlope" in ds
        and "RescaleIntercept" in ds
        and (float(ds.RescaleSlope), float(ds.RescaleIntercept)) != (1.0, 0.0)
    )
    lo, hi = _modality_range(ds)
    kind = _voi_kind(ds)
    if kind is not None:
        try:
            values, lo, hi = _apply_voi(values, ds, kind)
        except (ValueError, NotImplementedError, IndexError, AttributeError) as exc:
            logger.debug("ignoring unusable VOI (%s): %s", kind, exc)
            kind = None
    mode = normalize
    if normalize == "auto":
        mode = "minmax" if kind is None and rescaled else "range"
    out = _scale(np.asarray(values, dtype=np.float64), lo, hi, mode)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


def _scale(values: np.ndarray, lo: float, hi: float, normalize: Normalize) -> np.ndarray:
    """Scale to ``[0, 1]`` by ``[lo, hi]`` or, for ``"minmax"``, by each frame's extremes."""
    if normalize == "minmax":
        axes = tuple(range(1, values.ndim))
        lo_arr = values.min(axis=axes, keepdims=True)
        span = values.max(axis=axes, keepdims=True) - lo_arr
        return np.where(span > 0, (values - lo_arr) / np.where(span > 0, span, 1.0), 0.0)
    span = hi - lo
    if span <= 0:
        return np.zeros_like(values)
    return (values - lo) / span


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(F, C, H, W)`` images to 1 (luma, ITU-R BT.601) or 3 (repeated) channels."""
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 3 and have == 1:
        return np.repeat(images, 3, axis=1)
    if channels == 1 and have == 3:
        return np.tensordot(images, _LUMA, axes=([1], [0]))[:, None].astype(np.float32)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resize_image(images: np.ndarray, *, size: int) -> np.ndarray:
    """Resize ``(F, C, H, W)`` float images to ``size x size`` (bilinear, antialiased).

    Non-square images are stretched, as MedMNIST was made.

    Args:
        images: Float images in ``[0, 1]``.
        size: Output side length.

    Returns:
        ``float32`` ``(F, C, size, size)`` clipped to ``[0, 1]``.
    """
    if images.shape[2] == size and images.shape[3] == size:
        return np.asarray(images, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0).numpy()
