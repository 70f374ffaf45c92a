"""A PACS over DICOMweb (dicomweb-client): QIDO-RS search, WADO-RS retrieve of a series, STOW-RS store of a SEG.

A series is named by a URL: ``dicomweb://HOST[:PORT]/PATH/studies/<StudyUID>/series/<SeriesUID>`` (plain HTTP;
``dicomwebs://`` for HTTPS), where ``http://HOST:PORT/PATH`` is the server's DICOMweb root (Orthanc:
``/dicom-web``). Credentials come from the environment only, never from the command line or a config file:
``MLOPS_DICOMWEB_TOKEN`` (a bearer token) or ``MLOPS_DICOMWEB_USER`` + ``MLOPS_DICOMWEB_PASSWORD`` (HTTP basic).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from mlops.dicom.series import part10
from mlops.volumes import InputError

URL = re.compile(r"^(dicomwebs?)://([^/\s]+)(/[^\s]*?)?/studies/([0-9.]+)/series/([0-9.]+)/?$")


class DicomWebError(InputError):
    """The PACS could not be reached or refused a request (502 unless it said the series does not exist: 404)."""


@dataclass(frozen=True)
class SeriesRef:
    """Where a series lives: the server's DICOMweb root and the study and series UIDs."""

    root: str  # http(s)://host:port/path
    study: str
    series: str

    @property
    def url(self) -> str:
        scheme, rest = self.root.split("://", 1)
        return f"{'dicomwebs' if scheme == 'https' else 'dicomweb'}://{rest}/studies/{self.study}/series/{self.series}"


def is_dicomweb_url(text: str) -> bool:
    return text.startswith(("dicomweb://", "dicomwebs://"))


def parse_url(text: str) -> SeriesRef:
    """``dicomweb://host:8042/dicom-web/studies/S/series/R`` -> its root, study and series."""
    m = URL.match(text)
    if m is None:
        raise InputError(
            f"{text}: not a DICOMweb series URL; expected dicomweb://HOST[:PORT]/PATH/studies/<StudyInstanceUID>"
            "/series/<SeriesInstanceUID>",
            400,
        )
    scheme, host, path, study, series = m.groups()
    return SeriesRef(f"{'https' if scheme == 'dicomwebs' else 'http'}://{host}{path or ''}", study, series)


def session_from_env() -> requests.Session:
    """A requests session with the credentials the environment gives (none: anonymous)."""
    session = requests.Session()
    token = os.environ.get("MLOPS_DICOMWEB_TOKEN")
    user, password = os.environ.get("MLOPS_DICOMWEB_USER"), os.environ.get("MLOPS_DICOMWEB_PASSWORD")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    return session


def client(root: str, timeout_s: float = 60) -> DICOMwebClient:
    """A client whose retries (of a busy server's 429/503/504, and of refused connections) end within about 1.5 s:
    dicomweb-client's default backs off for 30 s before an unreachable PACS is reported."""
    web = DICOMwebClient(root, session=session_from_env(), timeout=timeout_s)
    web.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return web


def _failed(what: str, root: str, exc: Exception) -> DicomWebError:
    response: Any = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        code = 404 if status == 404 else 502
        reason = {401: "authentication failed (MLOPS_DICOMWEB_USER/PASSWORD or TOKEN)", 403: "access refused",
                  404: "not found"}.get(status, f"HTTP {status}")  # fmt: skip
        return DicomWebError(f"{root}: {what}: {reason}", code)
    return DicomWebError(f"{root}: {what}: the server could not be reached ({type(exc).__name__})", 502)


def retrieve_series(ref: SeriesRef, max_files: int, timeout_s: float = 60) -> list[Dataset]:
    """The series' instances (WADO-RS), after QIDO-RS says it exists and is within ``max_files`` instances."""
    web = client(ref.root, timeout_s)
    try:
        found = web.search_for_instances(ref.study, ref.series, limit=max_files + 1)
    except (requests.RequestException, OSError) as exc:
        raise _failed(f"searching series {ref.series}", ref.root, exc) from None
    if not found:
        raise DicomWebError(f"{ref.root}: no instances of series {ref.series} in study {ref.study}", 404)
    if len(found) > max_files:
        raise DicomWebError(f"{ref.root}: series {ref.series} has more than {max_files:,} instances "
                            "(dicom.max_files)", 413)  # fmt: skip
    try:
        return web.retrieve_series(ref.study, ref.series)
    except (requests.RequestException, OSError) as exc:
        raise _failed(f"retrieving series {ref.series}", ref.root, exc) from None


def store_seg(ref: SeriesRef, seg: Dataset, timeout_s: float = 60) -> str:
    """Store a SEG of the series ``ref`` names (STOW-RS) and return its own series' URL in the same study."""
    store(ref.root, [seg], timeout_s)
    return SeriesRef(ref.root, ref.study, str(seg.SeriesInstanceUID)).url


def store(root: str, datasets: list[Dataset], timeout_s: float = 60) -> None:
    """Store instances (STOW-RS); a refusal is an error naming the server's reason."""
    files = [pydicom.dcmread(io.BytesIO(part10(ds))) for ds in datasets]  # dicomweb-client writes what it is given:
    try:  # a dataset built in memory has no preamble, and a Part 10 reader (its own retrieve) then refuses it
        client(root, timeout_s).store_instances(files)
    except (requests.RequestException, OSError) as exc:
        raise _failed("storing", root, exc) from None


def find_series(root: str, study: str, modality: str | None = None, timeout_s: float = 60) -> list[dict[str, Any]]:
    """QIDO-RS: the series of a study (optionally of one modality), as DICOM JSON."""
    filters = {"Modality": modality} if modality else None
    try:
        return client(root, timeout_s).search_for_series(study, search_filters=filters)
    except (requests.RequestException, OSError) as exc:
        raise _failed(f"searching study {study}", root, exc) from None
