"""The import graph follows the processes: common <- client, common <- server <-
coordinator <- cli. A site never imports server code, the ServerApp never imports site
code, the coordinator never imports site code, and nothing below the CLI imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> installed package (pyproject.toml's package-dir)
FOLDERS = {"common": "fedpacs.common", "client": "fedpacs.client", "server": "fedpacs.server",
           "deploy": "fedpacs.deploy", "deploy/_root": "fedpacs"}
# layer -> the layers it may import
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "coordinator": {"common", "server", "coordinator"},
    "cli": {"common", "client", "server", "coordinator", "cli", "root"},
    "root": {"common", "root"},  # `import fedpacs; fedpacs.load_model(...)`
}


def layer(module: str) -> str:
    """The layer of a fedpacs module name."""
    if module == "fedpacs":
        return "root"
    part = module.split(".")[1]
    if module.startswith("fedpacs.server.coordinator"):
        return "coordinator"
    return {"common": "common", "client": "client", "server": "server", "deploy": "cli"}[part]


def imports(source: str, module: str) -> list[str]:
    """Every fedpacs module ``source`` imports, at top level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against this module's package
                base = ".".join(module.split(".")[:-node.level] + [node.module])
            if base.startswith("fedpacs"):
                out.append(base)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("fedpacs")]
    return out


def violations(source: str, module: str) -> list[str]:
    mine = layer(module)
    return [f"{module} ({mine}) imports {dep} ({layer(dep)})"
            for dep in imports(source, module) if layer(dep) not in ALLOWED[mine]]


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
        for sub in sorted(p for p in (ROOT / folder).iterdir() if (p / "__init__.py").is_file()):
            if f"{folder}/{sub.name}" in FOLDERS:
                continue
            for path in sorted(sub.rglob("*.py")):
                rel = path.relative_to(ROOT / folder).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                out[".".join([package, *parts])] = path
    return out


def test_the_import_graph_points_from_cli_to_common() -> None:
    found = modules()
    # every process's code is covered
    assert {"fedpacs.client.app", "fedpacs.server.app", "fedpacs.server.coordinator.federation",
            "fedpacs.deploy.cli.site", "fedpacs.common.wire", "fedpacs"} <= set(found)
    problems = [v for name, path in found.items()
                for v in violations(path.read_text(encoding="utf-8"), name)]
    assert problems == []


def test_the_check_catches_each_kind_of_wrong_import() -> None:
    assert violations("from fedpacs.client.pacs import PacsConfig", "fedpacs.common.config")
    assert violations("def f():\n    import fedpacs.server.app\n", "fedpacs.client.trainer")
    assert violations("from fedpacs.client.config import x", "fedpacs.server.coordinator.f")
    assert violations("from fedpacs.server.coordinator import x", "fedpacs.server.app")
    assert violations("from fedpacs.deploy.demo import x", "fedpacs.server.coordinator.f")
    assert violations("from ..client import config", "fedpacs.server.app")
    assert not violations("from fedpacs.common import wire", "fedpacs.client.app")
    assert not violations("from fedpacs.server.rundir import x", "fedpacs.server.coordinator.f")


def test_a_site_config_loads_without_torch_or_dicom_libraries() -> None:
    """Every ClientApp process (each SecAgg+ key-exchange stage too) reads the site config:
    it must not pull in torch, pydicom or pynetdicom (seconds per process)."""
    import subprocess
    import sys

    code = ("import sys, fedpacs.client.app, fedpacs.client.config, fedpacs.common.contract; "
            "print(sorted(m for m in ('torch', 'pydicom', 'pynetdicom', 'monai') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
