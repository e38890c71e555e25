"""A site's cohort from its PACS, against a real Orthanc (tests/orthanc_fixture.py starts it)."""

from __future__ import annotations

import urllib.error

import pytest

from tests.orthanc_fixture import OrthancServer, orthanc  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_orthanc_runs_with_dicomweb_and_refuses_a_wrong_password(orthanc: OrthancServer) -> None:
    assert orthanc.rest("/system")["DicomAet"] == "MEDFEDPACS"
    assert orthanc.rest("/dicom-web/studies") == []
    wrong = OrthancServer(**{**orthanc.__dict__, "password": "wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        wrong.rest("/system")
    assert err.value.code == 401
