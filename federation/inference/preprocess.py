"""Read DICOM, PNG/JPEG or ``.npz`` inputs exactly as training read its images.

Training images are ``float32 (N, C, H, W)`` in ``[0, 1]`` at ``data.image_size``:
DICOM files go through :func:`federation.data.dicom.read_image` (Modality LUT, VOI
LUT/window, MONOCHROME1 inversion, ``data.dicom_normalize``), channel matching and
:func:`federation.data.dicom.resize_image` (bilinear, antialiased); MedMNIST arrays
are ``uint8 / 255`` resized the same way. :func:`load_inputs` applies the same steps
to files given at prediction time, so a file gives the same tensor here as in a
site's dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from federation.data.dicom.reader import frame_indices, match_channels, read_image, resize_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})


@dataclass(frozen=True)
class Preprocessing:
    """How raw inputs become model tensors (stored with the exported model).

    Attributes:
        image_size: Side length fed to the model (``data.image_size``).
        in_channels: Channels the model expects (1 grey, 3 colour).
        dicom_frames: ``first``, ``middle`` or ``all`` frames of multi-frame DICOM.
        dicom_normalize: ``auto``, ``range`` or ``minmax`` (``data.dicom_normalize``).
        spatial_dims: 2 for images (the only kind files are read for), 3 volumes, 0 tabular.
        volume_shape: The spatial shape NIfTI volumes are padded/cropped to (segmentation
            datasets read with :mod:`federation.data.nifti`); empty: ``image_size`` per side.
    """

    image_size: int
    in_channels: int
    dicom_frames: str = "first"
    dicom_normalize: str = "auto"
    spatial_dims: int = 2
    volume_shape: tuple[int, ...] = ()

    def input_shape(self, batch: int | str = "N") -> tuple[int | str, ...]:
        """The model input shape: ``(N, C)`` plus ``volume_shape``, or ``image_size`` per spatial dimension."""
        return (batch, self.in_channels, *(self.volume_shape or [self.image_size] * self.spatial_dims))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {**asdict(self), "range": "[0, 1]", "resize": "bilinear, antialiased (torch interpolate)"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict` (extra keys ignored)."""
        return cls(
            image_size=int(data["image_size"]),
            in_channels=int(data["in_channels"]),
            dicom_frames=str(data.get("dicom_frames", "first")),
            dicom_normalize=str(data.get("dicom_normalize", "auto")),
            spatial_dims=int(data.get("spatial_dims", 2)),
            volume_shape=tuple(int(v) for v in data.get("volume_shape") or ()),
        )


@dataclass(frozen=True, eq=False)
class InputImage:
    """One model input: where it came from and its preprocessed pixels ``(C, H, W)``."""

    name: str
    image: np.ndarray


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def list_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """The input files at ``path``: the file itself, or every DICOM/image/.npz file below a folder (sorted).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder holds no usable file.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root} does not exist")
    found = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (p.suffix.lower() in IMAGE_SUFFIXES | {".npz"} or _is_dicom(p))
    )
    if not found:
        raise FileNotFoundError(f"--input {root} holds no DICOM, PNG/JPEG or .npz file")
    return found


def _finish(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """``(F, C, H, W)`` in [0, 1] -> the model's channels and size."""
    return resize_image(match_channels(np.asarray(images, dtype=np.float32), prep.in_channels), size=prep.image_size)


def _read_picture(path: Path, prep: Preprocessing) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 else 255.0
            data = (arr / scale)[None, None]
        else:
            rgb = np.asarray(img.convert("L" if prep.in_channels == 1 else "RGB"), dtype=np.float64) / 255.0
            data = rgb[None, None] if rgb.ndim == 2 else rgb.transpose(2, 0, 1)[None]
    return _finish(np.clip(data, 0.0, 1.0), prep)


def _npz_images(path: Path, split: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        for key in ("images", f"{split}_images"):
            if key in data.files:
                return np.asarray(data[key])
        keys = ", ".join(data.files)
    raise ValueError(f"{path}: no 'images' or '{split}_images' array (it holds {keys})")


def _read_npz(path: Path, prep: Preprocessing, split: str) -> np.ndarray:
    arr = _npz_images(path, split)
    if arr.ndim == 3:  # (N, H, W), MedMNIST grey
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):  # (N, H, W, C)
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4:
        raise ValueError(f"{path}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {arr.shape}")
    data = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return _finish(data, prep)


def iter_inputs(
    path: str | os.PathLike[str], prep: Preprocessing, *, npz_split: str = "test"
) -> Iterator[InputImage]:
    """Yield preprocessed inputs from a file or folder (DICOM, PNG/JPEG, ``.npz``).

    Names are the file path relative to ``path`` (or the file name), with
    ``#<frame>`` for each frame of a multi-frame DICOM (``dicom_frames=all``) and
    ``#<index>`` for each image of an ``.npz``.

    Args:
        path: A file or a folder (searched recursively).
        prep: The model's preprocessing.
        npz_split: ``.npz`` files: the ``<split>_images`` array used when there is no ``images``.

    Raises:
        FileNotFoundError: Nothing to read.
        ValueError: An unreadable file (the message names it).
    """
    if prep.spatial_dims != 2:
        raise ValueError(f"reading input files needs a 2-D image model; this one takes spatial_dims={prep.spatial_dims}")
    root = Path(path).expanduser()
    for file in list_inputs(root):
        name = file.name if file == root else file.relative_to(root).as_posix()
        try:
            if file.suffix.lower() == ".npz":
                images = _read_npz(file, prep, npz_split)
                for i, image in enumerate(images):
                    yield InputImage(name=f"{name}#{i}", image=image)
                continue
            if file.suffix.lower() in IMAGE_SUFFIXES:
                yield InputImage(name=name, image=_read_picture(file, prep)[0])
                continue
            images = _finish(read_image(file, frames=prep.dicom_frames, normalize=prep.dicom_normalize), prep)
        except Exception as err:  # noqa: BLE001 - pydicom/PIL raise many types; name the file
            raise ValueError(f"cannot read input {file}: {type(err).__name__}: {err}") from err
        if len(images) == 1:
            yield InputImage(name=name, image=images[0])
        else:
            for frame, image in zip(frame_indices(len(images), "all"), images):
                yield InputImage(name=f"{name}#{frame}", image=image)


def load_inputs(path: str | os.PathLike[str], prep: Preprocessing, *, npz_split: str = "test") -> list[InputImage]:
    """All of :func:`iter_inputs` as a list."""
    return list(iter_inputs(path, prep, npz_split=npz_split))
