"""Ingest throughput: fedpacs PACS ingest (C-GET, C-MOVE, DICOMweb) from a real Orthanc on
loopback, next to a plain ``pydicom.dcmread`` loop over the same files on local disk.

Prints instances/s for each. Usage: python bench/ingest.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom

from fedpacs.client.ingest import ingest
from fedpacs.client.pacs import CohortQuery
from fedpacs.common.procs import free_port
from fedpacs.deploy.demo import resolve_data_dir
from fedpacs.deploy.orthanc import OrthancServer, store_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    data = resolve_data_dir(args.data_dir)
    files = sorted(p for d in ("dicom_ct_dcmqa", "dicom_brainmr") for p in (data / d).rglob("*")
                   if p.is_file() and p.suffix != ".md" and p.name != "LICENSE"
                   and "README" not in p.name)
    mb = sum(p.stat().st_size for p in files) / 1e6
    t0 = time.perf_counter()
    for p in files:
        pydicom.dcmread(p).pixel_array  # noqa: B018 - decode like the converter does
    base = len(files) / (time.perf_counter() - t0)
    print(f"{len(files)} instances, {mb:.0f} MB")
    print(f"{'pydicom.dcmread + pixel_array (local disk)':45s} {base:8.1f} instances/s")
    with tempfile.TemporaryDirectory() as tmp:
        move_port = free_port()
        with OrthancServer(Path(tmp) / "orthanc", move_destinations={"FEDPACS": move_port}) as o:
            t0 = time.perf_counter()
            stored, failed = store_files(o.pacs_config(), files)
            print(f"{'C-STORE into Orthanc (loading)':45s} "
                  f"{stored / (time.perf_counter() - t0):8.1f} instances/s")
            for method in ("c-get", "c-move", "dicomweb"):
                cfg = o.pacs_config(method, move_destination="FEDPACS", storage_port=move_port)
                for convert in (False, True):
                    cache = Path(tmp) / f"cache-{method}-{convert}"
                    s = ingest(cfg, CohortQuery(), cache, convert=convert)
                    label = f"fedpacs ingest {method}" + (" + convert to volumes" if convert
                                                          else " (retrieve only)")
                    print(f"{label:45s} {s.retrieved / s.seconds:8.1f} instances/s "
                          f"({s.retrieved} in {s.seconds:.1f}s, {len(s.skipped)} skipped)")
                again = ingest(cfg, CohortQuery(), cache, convert=False)
                print(f"{'  second ingest (all cached)':45s} {again.seconds:8.2f} s, "
                      f"{again.retrieved} downloaded")


if __name__ == "__main__":
    main()
