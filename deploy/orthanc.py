"""A real Orthanc PACS on loopback, with fedpacs' own config, for tests, benches and demos.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide the server and plugin;
``.ci/run`` installs them. Each instance gets its own storage folder and free ports.
:func:`store_files` loads test data into a PACS (C-STORE); sites never store to a PACS.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from fedpacs.client.dicom import read_dicom
from fedpacs.client.pacs import TRANSFER_SYNTAXES, DimseTransport, PacsConfig
from fedpacs.common.errors import DataError, ProcessError
from fedpacs.common.procs import ProcessSet, child_env, free_port, port_open, wait_until

ORTHANC_NAME = "Orthanc"
ORTHANC_PATHS = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")  # Debian installs it in /usr/sbin
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")


def orthanc_binary() -> str | None:
    """The Orthanc executable: on PATH, else where Debian puts it (sbin is often off PATH)."""
    found = shutil.which(ORTHANC_NAME)
    if found:
        return found
    return next((p for p in ORTHANC_PATHS if Path(p).is_file()), None)


def orthanc_available() -> bool:
    return orthanc_binary() is not None


@dataclass
class OrthancServer:
    """One Orthanc process: DICOM on ``dicom_port``, REST + DICOMweb on ``http_port``."""

    workdir: Path
    aet: str = "ORTHANC"
    # AE titles this PACS may send C-MOVE results to: title -> port on 127.0.0.1
    move_destinations: dict[str, int] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    procs: ProcessSet = field(init=False)

    def __post_init__(self) -> None:
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.procs = ProcessSet(self.workdir / "logs")

    def config(self) -> dict[str, object]:
        plugins = [d for d in PLUGIN_DIRS if Path(d).is_dir()]
        return {
            "Name": f"fedpacs-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomModalities": {aet: [aet, "127.0.0.1", port]
                                for aet, port in self.move_destinations.items()},
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "Host": "127.0.0.1", "Ssl": False},
            "StableAge": 1, "SaveJobs": False,
        }

    def start(self, *, timeout_s: float = 60.0) -> OrthancServer:
        binary = orthanc_binary()
        if binary is None:
            raise ProcessError("Orthanc is not installed. Fix: `make system-deps` (apt-get "
                               "install orthanc orthanc-dicomweb dcmtk)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        self.procs.start("orthanc", [binary, str(cfg)], env=child_env(), cwd=self.workdir)
        wait_until(f"Orthanc on DICOM port {self.dicom_port} and HTTP {self.http_port}",
                   lambda: port_open("127.0.0.1", self.dicom_port)
                   and port_open("127.0.0.1", self.http_port),
                   timeout_s=timeout_s, alive=self.procs.check_alive)
        return self

    def stop(self) -> None:
        self.procs.stop_all(grace_s=10)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def pacs_config(self, method: str = "c-get", **kw: object) -> PacsConfig:
        return PacsConfig(method=method, host="127.0.0.1", port=self.dicom_port,
                          called_ae=self.aet, dicomweb_url=self.dicomweb_url, **kw)

    def statistics(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics",
                                    timeout=10) as r:
            return dict(json.loads(r.read()))


def store_files(cfg: PacsConfig, files: Sequence[str | Path]) -> tuple[int, list[tuple[str, str]]]:
    """C-STORE files into the PACS ``cfg`` names (to load test data), over one association.

    Returns (stored, [(file, reason)]) for the files that could not be read or stored;
    a PACS that refuses the association raises a PacsError.
    """
    dimse = DimseTransport(cfg)
    ae = dimse.new_ae()
    datasets: list[tuple[str, Dataset]] = []
    failed: list[tuple[str, str]] = []
    for f in files:
        try:
            datasets.append((str(f), read_dicom(Path(f), str(f))))
        except DataError as err:
            failed.append((str(f), err.problem))
    for sop in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.add_requested_context(sop, TRANSFER_SYNTAXES[:2])
    stored = 0
    with dimse.associate(ae) as assoc:
        for name, ds in datasets:
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                stored += 1
            else:
                failed.append((name, f"C-STORE status {getattr(status, 'Status', None)}"))
    return stored, failed
