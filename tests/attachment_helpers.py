"""Files and uploads for the attachment tests: real JPEG/PNG/PDF/DICOM bytes made here (Pillow,
pydicom), and a multipart upload through the real app."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import numpy as np
from api_helpers import Api, Identity, Reply, one
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def jpeg(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG")
    return out.getvalue()


def png(colour: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, "PNG")
    return out.getvalue()


def jpeg_with_exif() -> bytes:
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    exif = Image.Exif()
    exif[0x013B] = "刘奶奶的手机"  # Artist
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    )


PATIENT_NAME = "Liu^Nainai"
PATIENT_ID = "R-0042-身份"


def dicom_file(rows: int = 8, columns: int = 16) -> bytes:
    """A secondary-capture image, MONOCHROME2, 16 bits: the left half 0, the right half 1000,
    with the patient's identifiers set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the names are Chinese
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19530101"
    ds.PatientSex = "F"
    ds.InstitutionName = "安县人民医院"
    ds.AccessionNumber = "A123"
    ds.Modality = "OT"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    pixels = np.zeros((rows, columns), dtype=np.uint16)
    pixels[:, columns // 2 :] = 1000
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def form(
    data: bytes, filename: str = "report.bin", content_type: str = "application/pdf", **fields: str
) -> aiohttp.FormData:
    body = aiohttp.FormData()
    for name, value in fields.items():
        body.add_field(name, value)
    body.add_field("file", data, filename=filename, content_type=content_type)
    return body


async def upload(
    api: Api,
    cid: str,
    who: Identity | str | None,
    data: bytes | aiohttp.FormData | None = None,
    **fields: str,
) -> Reply:
    body = data if isinstance(data, aiohttp.FormData) else form(data or b"", **fields)
    async with api.client.post(one(cid, "/attachments"), data=body, headers=api.auth(who)) as r:
        raw = await r.read()
        parsed: Any = (
            json.loads(raw) if raw and "json" in r.headers.get("Content-Type", "") else None
        )
        return Reply(r.status, r.headers, raw, parsed)


def dicom_without_pixels() -> bytes:
    """A DICOM file that holds no image (a structured report would be one)."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_file()))
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_declared_compressed() -> bytes:
    """A DICOM file whose transfer syntax says JPEG baseline (its pixels are never decoded)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = dcmread(io.BytesIO(dicom_file()))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg()])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
