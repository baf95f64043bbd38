"""Fixtures for batch conversion: a tiny model, the NIfTI-path reference, a real Orthanc.

The Orthanc fixture installs Debian's ``orthanc`` and ``orthanc-dicomweb`` when they are missing
(apt-get, as root; the tests skip with the reason otherwise), runs one server per session on free
loopback ports with authentication on, a temporary storage folder, only registered AE titles
allowed (called AE titles checked too), and a Lua filter that makes it refuse CT instances of patient
``REFUSE-CT`` (a real failure status on store) and silently drop CT instance 3 of patient
``DROP-ONE`` (a success status for an instance it does not keep; ``Orthanc.drop_instance``
changes which), and stops it by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from model_fixtures import save_model
from pacs_helpers import (
    CLIENT_AET,
    DROPPED_PATIENT_ID,
    ORTHANC_AET,
    REFUSED_PATIENT_ID,
    ROOT,
    SHAPE,
    SPACING,
    free_ports,
)

from drdd_med.bundle import BundleTranslator
from drdd_med.data.demo import generate_head_phantom
from drdd_med.data.writers import write_volume

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_USER = ("drdd-test", "not-a-real-secret")
LUA_FILTER = f"""
function DroppedInstance()  -- the InstanceNumber to drop, from a file the tests write
  local file = io.open(DROP_FILE, 'r')
  if file == nil then return '' end
  local number = file:read('*l') or ''
  file:close()
  return number
end

function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'CT' and dicom.PatientID == '{REFUSED_PATIENT_ID}' then
    error('refused by the test PACS')
  end
  if dicom.Modality == 'CT' and dicom.PatientID == '{DROPPED_PATIENT_ID}'
      and dicom.InstanceNumber == DroppedInstance() then
    return false  -- Orthanc still answers success
  end
  return true
end
"""


# --- model and data --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """A tiny model file (these tests check wiring and values, not image quality)."""
    return {"ckpt": save_model(tmp_path_factory.mktemp("model") / "model.pt")}


@pytest.fixture(scope="session")
def translator(tiny_model) -> BundleTranslator:
    return BundleTranslator("drdd_mr2ct", device="cpu", ckpt=tiny_model["ckpt"])


@pytest.fixture(scope="session")
def nifti_reference(tmp_path_factory, tiny_model):
    """Synthetic CT (int16 HU) of demo seeds from the bundle's NIfTI path: ``monai.bundle`` inference.json."""
    from monai.bundle import ConfigParser

    cache: dict[int, np.ndarray] = {}

    def reference(seed: int) -> np.ndarray:
        if seed not in cache:
            work = tmp_path_factory.mktemp(f"nifti-{seed}")
            phantom = generate_head_phantom(seed, SHAPE, SPACING)
            mr = np.rint(phantom["mr"])  # as write_demo_mr_series stores it
            write_volume(mr, phantom["affine"], work / "mr" / f"case{seed}.nii.gz", dtype=np.float32)
            parser = ConfigParser()
            parser.read_config(str(ROOT / "bundles" / "drdd_mr2ct" / "configs" / "inference.json"))
            parser.update({
                "bundle_root": str(ROOT / "bundles" / "drdd_mr2ct"), "ckpt_path": str(tiny_model["ckpt"]),
                "device": "$torch.device('cpu')",
                "input": str(work / "mr"), "output_dir": str(work / "eval"),
            })
            parser.get_parsed_content("run")
            cache[seed] = np.asarray(nib.load(work / "eval" / f"case{seed}" / "sct.nii.gz").dataobj)
        return cache[seed]

    return reference


# --- Orthanc -----------------------------------------------------------------------------------------


def _find_orthanc() -> str | None:
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    return found if found and ORTHANC_PLUGIN.exists() else None


def _orthanc_binary() -> str:
    if _find_orthanc():
        return _find_orthanc()
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Orthanc is missing and cannot be installed (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "orthanc", "orthanc-dicomweb"]
    if subprocess.run(install, check=False, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True)
        subprocess.run(install, check=False, env=env, capture_output=True)
    return _find_orthanc() or pytest.skip("apt-get could not install orthanc and orthanc-dicomweb (no network?)")


class Orthanc:
    """A running test Orthanc: addresses, and REST helpers to upload and clear."""

    def __init__(self, process: subprocess.Popen, http_port: int, dicom_port: int, client_port: int,
                 drop_file: Path):
        import requests

        self.process = process
        self.http = f"http://127.0.0.1:{http_port}"
        self.dicomweb = f"{self.http}/dicom-web"
        self.dimse = f"dimse://{ORTHANC_AET}@127.0.0.1:{dicom_port}"
        self.client_port = client_port  # where Orthanc sends C-MOVE sub-operations for CLIENT_AET
        self.drop_file = drop_file
        self.session = requests.Session()
        self.session.auth = ORTHANC_USER

    def upload(self, files) -> None:
        for file in files:
            response = self.session.post(f"{self.http}/instances", data=Path(file).read_bytes())
            assert response.status_code == 200, response.text

    def clear(self) -> None:
        for patient in self.session.get(f"{self.http}/patients").json():
            self.session.delete(f"{self.http}/patients/{patient}").raise_for_status()

    def count(self, level: str = "series") -> int:
        return len(self.session.get(f"{self.http}/{level}").json())

    def drop_instance(self, number: str) -> None:
        """Which InstanceNumber of patient DROP-ONE's CT the filter drops ("" for none)."""
        self.drop_file.write_text(number)


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory):
    pytest.importorskip("pynetdicom")
    pytest.importorskip("dicomweb_client")
    binary = _orthanc_binary()
    folder = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port, client_port = free_ports(3)
    (folder / "filter.lua").write_text(f"DROP_FILE = '{folder / 'drop-instance'}'\n{LUA_FILTER}")
    config = {
        "Name": "drdd-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {ORTHANC_USER[0]: ORTHANC_USER[1]},
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowMove": False,
        "DicomAlwaysAllowGet": False,
        "DicomCheckModalityHost": True,
        "DicomCheckCalledAet": True,
        "DicomModalities": {"drdd": {"AET": CLIENT_AET, "Host": "127.0.0.1", "Port": client_port}},
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}", "Ssl": False},
        "LuaScripts": [str(folder / "filter.lua")],
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    with open(folder / "orthanc.log", "w") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(process, http_port, dicom_port, client_port, folder / "drop-instance")
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}:\n{(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if server.session.get(f"{server.http}/system", timeout=2).status_code == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("Orthanc did not answer within 30 s")
            time.sleep(0.1)
        yield server
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def orthanc(orthanc_server) -> Orthanc:
    """The session's Orthanc, emptied for this test, its filter dropping instance 3 of patient DROP-ONE."""
    orthanc_server.clear()
    orthanc_server.drop_instance("3")
    return orthanc_server
