"""Transfer learning in a federation: from scratch vs fine-tuning vs frozen features.

The comparison the seed papers make (ImageNet features fine-tuned or frozen), here with
what this machine holds: a ResNet-18 (the presets' width 16) trained federated on
PneumoniaMNIST chest X-rays is the source (``--init-model``); BreastMNIST ultrasound is the
target. Three federated runs on the target side by side, each 3 sites on disjoint
partitions, plain FedAvg, the server's held-out split (BreastMNIST's test set) evaluated
every round:

* ``scratch``: the network's seeded initial weights (today's default);
* ``fine-tune``: round 0 = the source's weights, every layer trains;
* ``frozen``: round 0 = the source's weights, only the head trains (``--freeze features``).

It prints the held-out AUC and accuracy per round of each, the seconds per round, and
whether each transfer run's round-0 weights hash (``weights_sha256`` in its record) equals
the source model's. The real fedpacs ServerApp and ClientApp run over
``tests.loopback.LoopbackGrid`` in this process (as in bench/zoo.py).

Usage: python bench/transfer.py [--source-rounds 3] [--rounds 4] [--threads 1]
           [--data-dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.zoo import federate, write_sites  # noqa: E402
from fedpacs.common.artifacts import read_model_file  # noqa: E402
from fedpacs.common.config import RunConfig  # noqa: E402
from fedpacs.common.tasks import TASK_PRESETS  # noqa: E402
from fedpacs.common.transfer import weights_sha256  # noqa: E402
from fedpacs.deploy.demo import DEMO_DATA, resolve_data_dir  # noqa: E402

SOURCE, TARGET = "pneumoniamnist", "breastmnist"
ARMS = {"scratch": {}, "fine-tune": {"freeze": "none"}, "frozen": {"freeze": "features"}}


def run(task: str, work: Path, data_dir: Path, *, name: str, rounds: int, threads: int,
        **recipe: Any) -> tuple[list[dict[str, Any]], Path, float]:
    """One 3-site federated run of ``task``; its rounds' records, run folder, seconds."""
    root = data_dir / DEMO_DATA[task].relpath
    sites = write_sites(work / name / "sites", task=TASK_PRESETS[task], custom=False,
                        fmt="medmnist", root=root, num_partitions=3, threads=threads)
    cfg = RunConfig(task=task, rounds=rounds, min_sites=3, secagg=False, cross_site=False,
                    eval_format="medmnist", eval_root=str(root), round_timeout_s=3600.0,
                    run_dir=str(work / name / "run"), run_name=name, **recipe)
    t0 = time.monotonic()
    records = federate(cfg, sites)
    return records, Path(cfg.run_dir), time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-rounds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    import logging

    import torch

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"source": SOURCE, "target": TARGET, "arms": {}}
    with tempfile.TemporaryDirectory(prefix="fedpacs-transfer-") as tmp:
        work = Path(tmp)
        src_rounds, src_dir, src_s = run(SOURCE, work, data_dir, name="source",
                                         rounds=args.source_rounds, threads=args.threads)
        source = src_dir / "final" / "model.pt"
        source_hash = weights_sha256(read_model_file(source)["state_dict"])
        held = src_rounds[-1].get("heldout", {})
        print(f"source: {SOURCE} ResNet-18, {args.source_rounds} rounds, {src_s:.0f} s, "
              f"held-out AUC {held.get('auc', float('nan')):.3f} "
              f"accuracy {held.get('accuracy', float('nan')):.3f}")
        out["source_heldout"] = held
        for arm, recipe in ARMS.items():
            extra = {"init_model": str(source), **recipe} if recipe else {}
            records, _, seconds = run(TARGET, work, data_dir, name=arm, rounds=args.rounds,
                                      threads=args.threads, **extra)
            out["arms"][arm] = {
                "auc": [r.get("heldout", {}).get("auc") for r in records],
                "accuracy": [r.get("heldout", {}).get("accuracy") for r in records],
                "seconds_per_round": seconds / args.rounds,
                "round0_is_source": records[0].get("weights_sha256") == source_hash,
            }
    print(f"\ntarget: {TARGET}, 3 sites, held-out AUC by round (0 = before training)")
    print(f"{'arm':<10} " + " ".join(f"{f'r{i}':>6}" for i in range(args.rounds + 1))
          + f" {'s/round':>8} {'round 0 = source':>17}")
    for arm, r in out["arms"].items():
        same = str(r["round0_is_source"]) if arm != "scratch" else "-"
        print(f"{arm:<10} " + " ".join(f"{v:6.3f}" for v in r["auc"])
              + f" {r['seconds_per_round']:8.1f} {same:>17}")
    print(f"\n{'arm':<10} final accuracy")
    for arm, r in out["arms"].items():
        print(f"{arm:<10} {r['accuracy'][-1]:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    transfer_ok = all(r["round0_is_source"] for a, r in out["arms"].items() if a != "scratch")
    return 0 if transfer_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
