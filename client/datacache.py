"""A site's decoded data set, kept warm across the messages of a run.

A warm site's parent process (fedpacs.client.warm) loads the data once and forks every
message's process from itself, so each finds the decoded arrays here, shared
copy-on-write, instead of reading and decoding every file again. The entry is keyed by
the site config file's bytes, the task's data fields, and the path, size and mtime of
every file under the data folders: the parent checks the key before each fork, so a
changed config or data file is loaded afresh for the next message, never served stale.

A task sampling "patches" keeps no voxels here: its entry is one small reader per case
(fedpacs.common.patches), checked once when loaded (labels read, skipped cases known), so
the parent forks cheaply and each message's process reads its cases from disk one at a
time: a site's memory does not grow with its cohort.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedpacs.client.config import SiteConfig
from fedpacs.client.data import load_site_data
from fedpacs.common.datasets import SiteData
from fedpacs.common.preprocess import preprocessed
from fedpacs.common.tasks import TaskConfig

_entry: tuple[str, SiteData] | None = None  # (key, data): the latest only
loads = 0  # how many times this process loaded (rather than found) a data set


def _file_stats(path: Path, digest: hashlib._Hash) -> None:
    """Feed path, size and mtime of ``path`` (a file, or every file below a folder)."""
    if path.is_file():
        st = path.stat()
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(folder, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def data_key(site: SiteConfig, task: TaskConfig) -> str:
    """What the decoded data depend on, hashed (the network is not among them)."""
    digest = hashlib.sha256()
    source = Path(site.source)
    digest.update(source.read_bytes() if source.is_file() else site.source.encode())
    data_fields = {k: v for k, v in task.to_dict().items() if k != "network"}
    digest.update(json.dumps(data_fields, sort_keys=True).encode())
    digest.update(repr((site.data, site.preprocess)).encode())
    for path in (site.data.root, site.data.labels):
        if path is not None and Path(path).exists():
            _file_stats(Path(path), digest)
    return digest.hexdigest()


def site_data(site: SiteConfig, task: TaskConfig) -> SiteData:
    """The site's data for ``task``: the warm entry when its key still matches, else
    loaded now (and kept, for the processes this one forks)."""
    global _entry, loads
    key = data_key(site, task)
    if _entry is not None and _entry[0] == key:
        return _entry[1]
    _entry = None  # the stale entry goes before the new one is loaded
    data = preprocessed(load_site_data(site.data, task, preprocess=site.preprocess), task)
    loads += 1
    _entry = (key, data)
    return data


def is_warm(site: SiteConfig, task: TaskConfig) -> bool:
    return _entry is not None and _entry[0] == data_key(site, task)
