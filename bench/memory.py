"""A site's peak memory loading and iterating one epoch: "fit" (eager arrays) vs "patches"
(cases streamed from disk), side by side over cohort sizes, in one run.

Each arm runs in its own process (peak resident set size, ``ru_maxrss``, of that process;
"imports" is the peak right after importing torch/MONAI/fedpacs, before any data) and
loads the site's training split as fedpacs.common.datasets.load_partition does, then
iterates one epoch of it through a DataLoader (batch 2, shuffled; what ``engine.train``
feeds the network):

- hippocampus (real MSD cases, /work/shared/data): cohorts of 10, 40 and all 260 cases;
  fit = the preset (every case cropped/padded to 48x64x48, held in RAM), patches = the same
  task streamed (cases are smaller than 48x64x48, so each patch is the padded case).
- CT-sized (SYNTHETIC: 256x256x100 int16 noise with a spherical "lesion", written to a
  temporary folder as uncompressed NIfTI): cohorts of 4 and 12; fit at native size
  (input_shape = the volume, 256x256x100, in RAM) vs patches of 96x96x48.
- one SYNTHETIC 512x512x200 CT-sized case trained for a few patch steps (epochs of one
  case; a UNet of width 8): the shape that reaches the network (a forward hook) against
  the case's own shape, which is never resized.

Usage: python bench/memory.py [--hippo 10,40,0] [--ct 4,12] [--big-steps 3]
(0 = every case). Figures depend on the machine only through the allocator; the ratio
column (peak above imports, relative to the smallest cohort of the arm) is the claim.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HIPPO = Path(os.environ.get("FEDPACS_DATA_DIR", Path(__file__).resolve().parents[2]
                            / "shared" / "data")) / "msd_hippocampus_udacity"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # (KiB on Linux)


# --------------------------------------------------------------------------- data
def cohort_folder(src: Path, dest: Path, n: int) -> Path:
    """The first ``n`` image/label pairs of ``src`` (0: all), linked into ``dest``."""
    from fedpacs.common.datasets import list_nifti_cases

    cases, _ = list_nifti_cases(src)
    for sub in ("images", "labels"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for c in cases[:n or None]:
        assert c.label is not None
        (dest / "images" / c.image.name).symlink_to(c.image)
        (dest / "labels" / c.label.name).symlink_to(c.label)
    return dest


def write_synthetic_ct(dest: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``n`` SYNTHETIC CT-sized cases: int16 noise around 40 HU, a sphere of 80 HU
    labelled 1 (radius an eighth of the smallest side) at a random place."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    r = min(shape) // 8
    for i in range(n):
        centre = [int(rng.integers(r, s - r)) for s in shape]
        ball = np.asarray(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
                          <= r * r)
        img = rng.normal(40, 20, shape).astype(np.int16)
        img[ball] += 40
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        nib.save(nib.Nifti1Image(img, affine), str(dest / "images" / f"ct_{i:03d}.nii"))
        nib.save(nib.Nifti1Image(ball.astype(np.uint8), affine),
                 str(dest / "labels" / f"ct_{i:03d}.nii"))
    return dest


# --------------------------------------------------------------------------- arms
def run_arm(arm: dict[str, Any]) -> dict[str, Any]:
    """In the child: import, load the split, iterate one epoch (or train, ``big``)."""
    import dataclasses

    import torch
    from torch.utils.data import DataLoader

    from fedpacs.common.config import DataSpec
    from fedpacs.common.datasets import load_partition
    from fedpacs.common.engine import TrainParams, train
    from fedpacs.common.models import build_model
    from fedpacs.common.patches import PatchDataset
    from fedpacs.common.tasks import TaskConfig

    torch.set_num_threads(1)
    imports = peak_mib()
    task = TaskConfig.from_dict(arm["task"])
    spec = DataSpec(format="nifti", root=Path(arm["root"]), holdout_fraction=0.0,
                    val_fraction=0.0)
    t0 = time.perf_counter()
    data = load_partition(spec, task)
    out: dict[str, Any] = {"cases": len(data.train), "imports": imports}
    if arm.get("train_steps"):
        assert isinstance(data.train, PatchDataset)
        case = data.train.readers[0].read()[0].shape
        seen: list[tuple[int, ...]] = []
        model = build_model(dataclasses.replace(task))
        model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
        res = train(model, data.train, task=task, device=torch.device("cpu"), seed=0,
                    params=TrainParams(epochs=arm["train_steps"], batch_size=1, lr=1e-3))
        out |= {"case": list(case), "net_input": [list(s) for s in sorted(set(seen))],
                "steps": len(seen), "loss": res.loss}
    else:
        ds = data.train.drawn(seed=0, epoch=0) if isinstance(data.train, PatchDataset) \
            else data.train
        shapes = set()
        for x, _ in DataLoader(ds, batch_size=2, shuffle=True,
                               generator=torch.Generator().manual_seed(0)):
            shapes.add(tuple(x.shape[1:]))
        out["net_input"] = [list(s) for s in sorted(shapes)]
    out |= {"seconds": time.perf_counter() - t0, "peak": peak_mib()}
    return out


def spawn(arm: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--arm", json.dumps(arm)], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm['label']} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def task_dict(**kw: Any) -> dict[str, Any]:
    from fedpacs.common.tasks import TASK_PRESETS

    return TASK_PRESETS["hippocampus"].to_dict() | kw


def shape_text(shapes: list[list[int]]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--hippo", default="10,40,0", help="hippocampus cohorts (0 = all)")
    ap.add_argument("--ct", default="4,12", help="synthetic 256x256x100 cohorts")
    ap.add_argument("--big-steps", type=int, default=3,
                    help="patch steps on one synthetic 512x512x200 case (0 = skip)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(json.loads(args.arm))))
        return
    hippo_sizes = [int(n) for n in args.hippo.split(",") if n]
    ct_sizes = [int(n) for n in args.ct.split(",") if n]
    rows: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="fedpacs-memory-") as tmp:
        base = Path(tmp)
        for n in hippo_sizes:
            root = cohort_folder(HIPPO, base / f"hippo{n}", n)
            for mode, kw in (("fit", {}), ("patches", {"sampling": "patches"})):
                arm: dict[str, Any] = {"label": f"hippocampus {mode}",
                                       "root": str(root), "task": task_dict(**kw)}
                rows.append((str(arm["label"]), mode, spawn(arm)))
        if ct_sizes:
            ct = write_synthetic_ct(base / "ct", max(ct_sizes), (256, 256, 100))
            for n in ct_sizes:
                root = cohort_folder(ct, base / f"ct{n}", n)
                ct_modes: tuple[tuple[str, dict[str, Any]], ...] = (
                    ("fit", {"input_shape": [256, 256, 100]}),
                    ("patches", {"sampling": "patches", "input_shape": [96, 96, 48]}))
                for mode, kw in ct_modes:
                    arm = {"label": f"CT-sized SYNTHETIC {mode}", "root": str(root),
                           "task": task_dict(name="ct", num_classes=2, class_names=[],
                                             **kw)}
                    rows.append((str(arm["label"]), mode, spawn(arm)))
        big = None
        if args.big_steps:
            root = write_synthetic_ct(base / "big", 1, (512, 512, 200), seed=1)
            big = spawn({"label": "big", "root": str(root), "train_steps": args.big_steps,
                         "task": task_dict(name="ct-big", num_classes=2, class_names=[],
                                           sampling="patches", input_shape=[96, 96, 48],
                                           width=8)})
    print("command: python bench/memory.py " + " ".join(argv if argv is not None
                                                       else sys.argv[1:]))
    print(f"{'arm':<28} {'cases':>5}  {'sample reaching the network':<28} {'peak MiB':>9} "
          f"{'above imports':>13} {'x smallest':>10} {'s':>6}")
    first: dict[str, float] = {}
    for label, _, r in rows:
        above = r["peak"] - r["imports"]
        smallest = first.setdefault(label, above)
        ratio = above / smallest if smallest > 0 else float("nan")
        print(f"{label:<28} {r['cases']:>5}  {shape_text(r['net_input']):<28} "
              f"{r['peak']:>9.0f} {above:>13.0f} {ratio:>10.2f} {r['seconds']:>6.1f}")
    if big is not None:
        print(f"\nSYNTHETIC 512x512x200 CT-sized case, {big['steps']} patch steps "
              f"(width-8 UNet, batch 1, 1 thread): case {shape_text([big['case']])} at its "
              f"native size, network input {shape_text(big['net_input'])}; peak "
              f"{big['peak']:.0f} MiB ({big['peak'] - big['imports']:.0f} above imports), "
              f"{big['seconds']:.1f} s in all, loss {big['loss']:.3f}")


if __name__ == "__main__":
    main()
