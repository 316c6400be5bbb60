"""How far two runs' global models are apart, round by round, side by side.

Reads the round checkpoints (``rounds/round-NNN/model.pt``) of two run directories of the
same task and network, for example the FedAvg and the SecAgg+ run of one seed that
``bench/accuracy.py --work DIR`` keeps. For each round both have, it prints the largest
difference of one value, the norm of the whole difference, and the tensor whose
difference is largest relative to its own norm. Floating-point tensors only; BatchNorm's
batch counters are shown apart, since SecAgg+ sends them as 0.

Usage: python bench/checkpoint_diff.py RUN_A RUN_B [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpacs.common.artifacts import read_model_file  # noqa: E402
from fedpacs.server.rundir import round_folder  # noqa: E402


def round_diff(a: Path, b: Path) -> dict[str, object]:
    """One round's checkpoints ``a`` and ``b`` compared (see the module's docstring)."""
    sa, sb = (read_model_file(p)["state_dict"] for p in (a, b))
    floats = [k for k in sa if sa[k].is_floating_point()]
    diffs = {k: (sa[k].double() - sb[k].double()) for k in floats}
    rel = {k: float(d.norm() / (sa[k].double().norm() + 1e-12)) for k, d in diffs.items()}
    worst = max(rel, key=rel.__getitem__)
    counters = {k: (int(sa[k]), int(sb[k])) for k in sa if not sa[k].is_floating_point()}
    return {"max_abs": max(float(d.abs().max()) for d in diffs.values()),
            "norm": sum(float(d.norm()) ** 2 for d in diffs.values()) ** 0.5,
            "worst_tensor": worst, "worst_relative": rel[worst],
            "counters": dict(list(counters.items())[:1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    n = 0
    while all((round_folder(r, n) / "model.pt").is_file() for r in (args.run_a, args.run_b)):
        row = {"round": n} | round_diff(round_folder(args.run_a, n) / "model.pt",
                                        round_folder(args.run_b, n) / "model.pt")
        rows.append(row)
        print(f"round {n}: max |a-b| {row['max_abs']:.2e}  norm {row['norm']:.3e}  "
              f"worst {row['worst_tensor']} (relative {row['worst_relative']:.2e})  "
              f"counters a, b {row['counters']}")
        n += 1
    if not rows:
        print(f"no round checkpoint in both {args.run_a} and {args.run_b}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps({"run_a": str(args.run_a), "run_b": str(args.run_b),
                                         "rounds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
