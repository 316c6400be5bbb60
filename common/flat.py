"""Flat records: a frozen dataclass read from a flat mapping (Flower's run config, a
recipe in round instructions). Keys may use '-' for '_'; each value must have the type of
the field's default (an int is taken for a float). One reader for both, so a run config
and a recipe are refused the same way."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from fedpacs.common.errors import FieldError, did_you_mean


def type_name(v: object) -> str:
    return f"{v!r} ({type(v).__name__})"


def read_flat(cls: type, flat: dict[str, Any], *, prefix: str = ""
              ) -> tuple[dict[str, Any], list[FieldError]]:
    """The field values of ``cls`` found in ``flat`` (by field name), and every unknown
    key or wrongly typed value (fields named ``prefix`` + key)."""
    known = {f.name: f.default for f in fields(cls)}
    values: dict[str, Any] = {}
    errs: list[FieldError] = []
    for key, v in flat.items():
        name = str(key).replace("-", "_")
        if name not in known:
            names = ", ".join(k.replace("_", "-") for k in known)
            errs.append(FieldError(f"{prefix}{key}", f"one of {names}", repr(key),
                                   "remove or rename the key"
                                   + did_you_mean(name.replace("_", "-"),
                                                  [k.replace("_", "-") for k in known])))
            continue
        default = known[name]
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not type(default):
            want = type(default).__name__
            errs.append(FieldError(f"{prefix}{key}", want, type_name(v),
                                   f"set {key} to a {want}"))
            continue
        values[name] = v
    return values, errs
