"""Time of a SecAgg+ round over the time of a plain FedAvg round, same sites and model.

Two measurements:

* ``federation``: real processes (SuperLink + N site daemons over TLS, signed app) run
  the same task twice, with and without SecAgg+; the round time is the gap between two
  successive round records (train + evaluate + checkpoint), averaged over rounds >= 2.
* ``protocol``: the same ServerApp/ClientApp code in one process (no transport, no task
  process start-up), isolating the cost of the SecAgg+ maths (key agreement, secret
  sharing, quantisation, masking, unmasking) on the model's size.

Usage: python bench/secagg.py [--task breastmnist] [--sites 3] [--rounds 3] [--skip-federation]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpacs.client.app import app as client_app  # noqa: E402
from fedpacs.common.config import RunConfig  # noqa: E402
from fedpacs.common.models import build_model  # noqa: E402
from fedpacs.deploy.demo import DEMO_DATA, demo_sites, run_once, site_names  # noqa: E402
from fedpacs.server.app import run_federation  # noqa: E402
from fedpacs.server.coordinator.federation import SiteSpec  # noqa: E402
from fedpacs.server.coordinator.pki import Pki, provision  # noqa: E402
from tests.loopback import LoopbackGrid  # noqa: E402


def round_seconds(rounds: list[dict[str, object]]) -> list[float]:
    times = [float(r["time"]) for r in rounds]  # type: ignore[arg-type]
    return [b - a for a, b in zip(times[1:], times[2:], strict=False)]


def configs(work: Path, task: str, sites: int, secagg: bool
            ) -> tuple[RunConfig, Pki, list[SiteSpec]]:
    names = site_names(sites)
    pki = provision(work / "pki", sites=names)
    specs = demo_sites(work, pki, task=task, data_dir=None, names=names, require_secagg=secagg)
    cfg = RunConfig(task=task, rounds=1, local_epochs=1, min_sites=sites, secagg=secagg,
                    cross_site=False, run_dir=str(work / "run"))
    return cfg, pki, specs


def federation(task: str, sites: int, rounds: int, secagg: bool) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="fedpacs-bench-") as tmp:
        work = Path(tmp)
        cfg, pki, specs = configs(work, task, sites, secagg)
        res = run_once(work, pki, specs, replace(cfg, rounds=rounds), timeout_s=1800,
                       echo=lambda _: None)
        return round_seconds(res.rounds)


def protocol(task: str, sites: int, rounds: int, secagg: bool) -> list[float]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    with tempfile.TemporaryDirectory(prefix="fedpacs-bench-") as tmp:
        work = Path(tmp)
        cfg, _, specs = configs(work, task, sites, secagg)
        grid = LoopbackGrid(client_app, {i + 1: s.config for i, s in enumerate(specs)})
        run_federation(grid, replace(cfg, rounds=rounds), Context(1, 0, {}, RecordDict(), {}))
        import json

        rec = json.loads((work / "run" / "metrics.json").read_text())["rounds"]
        return round_seconds(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="breastmnist", choices=sorted(DEMO_DATA))
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-federation", action="store_true",
                    help="only the in-process protocol measurement")
    args = ap.parse_args()
    params = sum(p.numel() for p in build_model(RunConfig(task=args.task).task_config())
                 .state_dict().values())
    print(f"task {args.task}: {params:,} model values, {args.sites} sites, "
          f"{args.rounds} rounds (round 1 excluded as warm-up)")
    kinds = [("protocol", protocol)] + ([] if args.skip_federation else
                                        [("federation", federation)])
    for kind, fn in kinds:
        times = {}
        for secagg in (False, True):
            t0 = time.perf_counter()
            times[secagg] = statistics.mean(fn(args.task, args.sites, args.rounds, secagg))
            print(f"  {kind:10s} {'SecAgg+' if secagg else 'plain  '}: "
                  f"{times[secagg]:7.2f} s/round  ({time.perf_counter() - t0:.0f} s in all)",
                  flush=True)
        print(f"  {kind:10s} SecAgg+ / plain round time: {times[True] / times[False]:.2f}x")


if __name__ == "__main__":
    main()
