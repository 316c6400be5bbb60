"""One hospital's set-up, run inside its own network namespace by the end-to-end tests:
its PACS (a real Orthanc on the namespace's own loopback) holds its part of the
hippocampus cases as DICOM; the hospital writes its site config and ingests with
``fedpacs site ingest`` exactly as the README tells it; the PACS then stops (training
reads the site's cache). Prints one JSON line: cases stored, training volumes, seconds.

    ip netns exec NS python -m tests.hospital --home DIR --name site-a --data-root HIPPO \\
        --partition 0 --num-partitions 4 --trusted-app-key KEY [--max-cases N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fedpacs.common.procs import child_env, tool
from fedpacs.deploy.orthanc import OrthancServer, store_files
from tests.hippo_pacs import hospital_holdings, write_pacs_site_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--partition", type=int, required=True)
    p.add_argument("--num-partitions", type=int, required=True)
    p.add_argument("--trusted-app-key", type=Path, required=True)
    p.add_argument("--require-secagg", action="store_true")
    p.add_argument("--max-cases", type=int, default=None,
                   help="only the first N cases of the hospital's part (a PACS fills at "
                        "~60 ms per instance here)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    home: Path = args.home
    holdings = hospital_holdings(args.data_root, partition=args.partition,
                                 num_partitions=args.num_partitions, out=home / "pacs-source",
                                 max_cases=args.max_cases)
    with OrthancServer(home / "orthanc") as pacs:
        stored, failed = store_files(pacs.pacs_config(), holdings.files)
        if failed:
            print(json.dumps({"error": f"{len(failed)} files not stored: {failed[:3]}"}))
            return 1
        config = write_pacs_site_config(home, name=args.name, pacs=pacs.pacs_config("c-get"),
                                        holdings=holdings,
                                        trusted_app_keys=[args.trusted_app_key],
                                        require_secagg=args.require_secagg)
        ingest = subprocess.run([tool("fedpacs"), "site", "ingest", "--config", str(config)],
                                env=child_env(), capture_output=True, text=True, timeout=600,
                                check=False)
    check = subprocess.run([tool("fedpacs"), "site", "check", "--config", str(config)],
                           env=child_env(), capture_output=True, text=True, timeout=300,
                           check=False)
    print(json.dumps({"cases": len(holdings.case_ids), "instances": stored,
                      "ingest_exit": ingest.returncode, "ingest": ingest.stdout[-2000:],
                      "check_exit": check.returncode, "check": check.stdout.strip()[-500:],
                      "config": str(config), "seconds": round(time.monotonic() - t0, 1)}))
    return 0 if ingest.returncode == 0 and check.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
