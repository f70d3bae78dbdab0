"""DICOM attachments through pydicom: the metadata shown (whole for the care team, an allow-list
without patient identifiers for trainees) and the image as PNG for uncompressed files.

De-identification is by allow-list, not by striking known identifiers: a file may carry an
identifier in any of hundreds of elements (PS3.15 annex E lists them) and in private tags, so
trainees are shown only elements that describe the image and the examination."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# What a trainee is shown: the examination and the picture, never who, where or when exactly.
TRAINEE_ELEMENTS = frozenset(
    {
        "Modality",
        "BodyPartExamined",
        "ImageType",
        "SOPClassUID",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "PixelSpacing",
        "SliceThickness",
        "WindowCenter",
        "WindowWidth",
        "RescaleIntercept",
        "RescaleSlope",
        "ViewPosition",
        "Laterality",
        "ImageLaterality",
        "KVP",
        "ExposureTime",
        "PatientSex",
        "PatientAge",
    }
)
# Elements that identify the patient (PS3.15 annex E, the ones most files carry): never in a
# trainee's view (the allow-list above already keeps them out; tests check both).
PATIENT_IDENTIFIERS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientMotherBirthName",
        "IssuerOfPatientID",
        "MedicalRecordLocator",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "StudyID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    }
)
# A value shown longer than this is cut (free text, long multi-values).
_MAX_VALUE_CHARS = 512
# Larger pictures are not rendered: their arithmetic (float64) would take over 128 MiB.
MAX_RENDER_PIXELS = 4096 * 4096


class DicomUnreadable(Exception):
    """A file that starts like DICOM and that pydicom cannot read."""


class NotRenderable(Exception):
    """A DICOM file whose pixels cannot be made into a PNG here (compressed, none, too big)."""


def read(data: bytes, *, pixels: bool = False) -> Dataset:
    try:
        with _quiet():
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except InvalidDicomError as exc:
        raise DicomUnreadable(f"pydicom cannot read it: {_short(exc)}") from None
    except Exception as exc:
        # The file is the client's: whatever pydicom trips over in it, it is not readable DICOM.
        raise DicomUnreadable(
            f"pydicom cannot read it ({type(exc).__name__}: {_short(exc)})"
        ) from None


def check(data: bytes) -> None:
    """Raises DicomUnreadable unless the file reads as DICOM, every top-level element too."""
    ds = read(data)
    meta = getattr(ds, "file_meta", None)
    for needed in ("TransferSyntaxUID", "MediaStorageSOPClassUID"):
        if meta is None or needed not in meta:
            raise DicomUnreadable(f"its file meta information has no {needed}")
    try:
        with _quiet():
            for element in ds:
                _ = element.value
    except Exception as exc:
        raise DicomUnreadable(f"an element does not read: {_short(exc)}") from None


def metadata(data: bytes, *, deidentified: bool) -> dict[str, Any]:
    """Top-level public elements by keyword, as JSON values (strings, numbers, lists of them);
    sequences and binary values left out. `deidentified`: the trainee allow-list only."""
    ds = read(data)
    shown: dict[str, Any] = {}
    transfer = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer is not None:
        shown["TransferSyntaxUID"] = str(transfer)
    for element in ds:
        keyword = element.keyword
        if not keyword or element.tag.is_private or element.VR in _SKIPPED_VR:
            continue
        if deidentified and keyword not in TRAINEE_ELEMENTS:
            continue
        try:
            with _quiet():
                value = _json_value(element.value)
        except Exception:
            continue  # a value pydicom cannot convert is not shown, never a 500
        if value is not None:
            shown[keyword] = value
    return shown


_SKIPPED_VR = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def _json_value(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return [_json_value(v) for v in list(value)[:64]]
    if isinstance(value, PersonName):
        return str(value)[:_MAX_VALUE_CHARS]
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, bytes):
        return None
    return str(value)[:_MAX_VALUE_CHARS]


def render_png(data: bytes) -> bytes:
    """The first frame as an 8-bit PNG: the modality and VOI transforms applied (the file's
    window, else its full range), MONOCHROME1 inverted, colour kept as RGB."""
    ds = read(data, pixels=True)
    if "PixelData" not in ds:
        raise NotRenderable("the file holds no image (no PixelData)")
    transfer = ds.file_meta.get("TransferSyntaxUID")
    if transfer is not None and transfer.is_compressed:
        raise NotRenderable(
            f"its pixels are compressed ({transfer.name}); the server renders uncompressed "
            "DICOM only"
        )
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * columns > MAX_RENDER_PIXELS or rows * columns == 0:
        raise NotRenderable(f"a {columns}×{rows} image is not rendered here")
    try:
        with _quiet():
            image = _image(ds)
    except Exception as exc:
        raise NotRenderable(f"its pixels do not decode: {_short(exc)}") from None
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _image(ds: Dataset) -> Any:
    from PIL import Image
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return Image.fromarray(_to_uint8(pixels.astype(np.float64)), "RGB")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    grey = _to_uint8(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns about what uploaded files do wrong (a value not in its VR, a charset): the
    file is the client's, and what cannot be read is answered as such, not logged as ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _to_uint8(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
