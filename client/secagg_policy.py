"""The site's own floor on the SecAgg+ protocol the server asks it to run.

The coordinator may be malicious, and Flower's ``secaggplus_mod`` takes the round's sample
number, share count and reconstruction threshold from the server and answers any unmask
request. :func:`check_secagg_request` is the site's own policy, checked before the mod
sees a stage: enough sites, a threshold at or above the site's floor and a strict majority
of the shares (so that no split of the share holders can hand the server both a site's
mask seed and its mask key), and every later stage consistent with what this site agreed
to at setup and holds in its state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedpacs.common.errors import FieldError

if TYPE_CHECKING:
    from flwr.app.typing import ConfigRecordValues

    from fedpacs.client.config import SecurityConfig


# --- the site's SecAgg+ policy -------------------------------------------------------------

SECAGG_ROUND_KEY = "fedpacs_secagg_round"  # context.state: the round this site last set up
SETUP_PARAMS: dict[str, type] = {  # what setup fixes for the whole round, and its type
    Key.SAMPLE_NUMBER: int, Key.SHARE_NUMBER: int, Key.THRESHOLD: int,
    Key.CLIPPING_RANGE: float, Key.TARGET_RANGE: int, Key.MOD_RANGE: int,
    Key.MAX_WEIGHT: float}
_F = f"{RECORD_KEY_CONFIGS}."
_OFF_PROTOCOL = ("nothing on this site: the coordinator is not following the SecAgg+ "
                 "protocol; report it to the federation operator")
_RAISE_SITES = ("start the run with more sites (--min-sites), or lower secagg_min_sites "
                "in this site's [security] table")
_RAISE_THRESHOLD = ("set [secagg] threshold above 0.5 in the run's run.toml, or lower "
                    "secagg_min_threshold in this site's [security] table")


def check_secagg_request(stage_config: ConfigRecord, state: ConfigRecord,
                         policy: SecurityConfig, *, round_id: str = "",
                         setup_round_id: str | None = None) -> list[FieldError]:
    """Every way one SecAgg+ stage request breaks this site's policy (empty: go ahead).

    ``stage_config`` is the message's ``secaggplus_configs`` record, ``state`` the mod's
    ``secaggplus_state`` record (what this site agreed to at setup and holds since),
    ``round_id`` the message's group id and ``setup_round_id`` the round this site last set
    up. Reads its inputs only.
    """
    stage = stage_config.get(Key.STAGE)
    if stage == Stage.SETUP:
        errs = _check_setup(stage_config, policy)
        if not errs and setup_round_id == round_id:  # a second setup of the same round
            errs += _changed_after_setup(stage_config, state, round_id)
        return errs
    if stage not in Stage.all():
        return [FieldError(f"{_F}{Key.STAGE}", f"one of {', '.join(Stage.all())}",
                           repr(stage), _OFF_PROTOCOL)]
    current = state.get("current_stage", Stage.UNMASK)
    stages = Stage.all()
    expected = stages[(stages.index(current) + 1) % len(stages)] if current in stages \
        else Stage.SETUP
    if stage != expected:
        return [FieldError(f"{_F}{Key.STAGE}", f"{expected!r} (this site's last stage was "
                           f"{current!r})", repr(stage), _OFF_PROTOCOL)]
    errs = []
    if round_id != setup_round_id:
        errs.append(FieldError("group_id", f"round {setup_round_id!r}, the one this site set "
                               "up", f"round {round_id!r}", _OFF_PROTOCOL))
    errs += _changed_after_setup(stage_config, state, round_id)
    if stage == Stage.SHARE_KEYS:
        errs += _check_share_keys(stage_config, state, policy)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        errs += _check_sources(stage_config, state)
    else:
        errs += _check_unmask(stage_config, state)
    return errs


def _check_setup(cfg: ConfigRecord, policy: SecurityConfig) -> list[FieldError]:
    errs = [FieldError(f"{_F}{key}", "an integer" if kind is int else "a number",
                       _kind(cfg.get(key)), _OFF_PROTOCOL)
            for key, kind in SETUP_PARAMS.items()
            if type(cfg.get(key)) not in ((int,) if kind is int else (int, float))]
    if errs:
        return errs
    n, m, t = (_int(cfg, k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
    floor, t_floor = policy.secagg_min_sites, policy.secagg_min_threshold
    if n < floor:
        errs.append(FieldError(f"{_F}{Key.SAMPLE_NUMBER}", f">= {floor} sites in the round "
                               "(this site's secagg_min_sites)", str(n), _RAISE_SITES))
    if m > n:
        errs.append(FieldError(f"{_F}{Key.SHARE_NUMBER}", f"<= sample_num ({n})", str(m),
                               _OFF_PROTOCOL))
    if m < floor:
        errs.append(FieldError(f"{_F}{Key.SHARE_NUMBER}", f">= {floor} sites holding shares "
                               "(this site's secagg_min_sites)", str(m), _RAISE_SITES))
    if t < t_floor:
        errs.append(FieldError(f"{_F}{Key.THRESHOLD}", f">= {t_floor} (this site's "
                               "secagg_min_threshold)", str(t), _RAISE_THRESHOLD))
    if 2 * t <= m:
        errs.append(FieldError(f"{_F}{Key.THRESHOLD}", f"a strict majority of the {m} shares "
                               f"(> {m / 2:g})", str(t), _RAISE_THRESHOLD))
    if t > m:
        errs.append(FieldError(f"{_F}{Key.THRESHOLD}", f"<= share_num ({m})", str(t),
                               _OFF_PROTOCOL))
    for key in (Key.CLIPPING_RANGE, Key.MAX_WEIGHT, Key.TARGET_RANGE):
        if not _num(cfg, key) > 0:
            errs.append(FieldError(f"{_F}{key}", "> 0", f"{_num(cfg, key):g}", _OFF_PROTOCOL))
    target, modulus = _int(cfg, Key.TARGET_RANGE), _int(cfg, Key.MOD_RANGE)
    if modulus <= target:
        errs.append(FieldError(f"{_F}{Key.MOD_RANGE}", f"> target_range ({target})",
                               str(modulus), _OFF_PROTOCOL))
    return errs


def _changed_after_setup(cfg: ConfigRecord, state: ConfigRecord, round_id: str
                         ) -> list[FieldError]:
    return [FieldError(f"{_F}{key}", f"{state[key]!r}, as set up for round {round_id!r}",
                       repr(cfg[key]), _OFF_PROTOCOL)
            for key in SETUP_PARAMS if key in cfg and key in state and cfg[key] != state[key]]


def _check_share_keys(cfg: ConfigRecord, state: ConfigRecord, policy: SecurityConfig
                      ) -> list[FieldError]:
    keys = {k: v for k, v in cfg.items() if k != Key.STAGE}
    errs = [FieldError(f"{_F}{k}", "a node id with that node's two public keys",
                       f"{k!r}: {_kind(v)}", _OFF_PROTOCOL)
            for k, v in keys.items() if not (k.isdigit() and _is_list(v, bytes, size=2))]
    nid, pks = str(_int(state, "nid")), [state.get("pk1"), state.get("pk2")]
    if keys.get(nid) != pks:
        errs.append(FieldError(f"{_F}{nid}", "this site's own public keys from setup",
                               "missing" if nid not in keys else "other keys", _OFF_PROTOCOL))
    n, m, t = len(keys), _int(state, Key.SHARE_NUMBER), _int(state, Key.THRESHOLD)
    if n < policy.secagg_min_sites:
        errs.append(FieldError(f"{_F}<node ids>", f">= {policy.secagg_min_sites} sites "
                               "to share with (this site's secagg_min_sites)", str(n),
                               _RAISE_SITES))
    if n > m:
        errs.append(FieldError(f"{_F}<node ids>", f"<= share_num ({m}) sites, as set up",
                               str(n), _OFF_PROTOCOL))
    if n < t:
        errs.append(FieldError(f"{_F}<node ids>", f">= threshold ({t}) sites", str(n),
                               _OFF_PROTOCOL))
    flat = [pk for v in keys.values() if isinstance(v, list) for pk in v]
    if len(set(flat)) != len(flat):
        errs.append(FieldError(f"{_F}<public keys>", "distinct keys for every site",
                               "repeated keys", _OFF_PROTOCOL))
    return errs


def _check_sources(cfg: ConfigRecord, state: ConfigRecord) -> list[FieldError]:
    srcs, ctxts = _int_list(cfg.get(Key.SOURCE_LIST)), cfg.get(Key.CIPHERTEXT_LIST)
    if srcs is None or not isinstance(ctxts, list) or not _is_list(ctxts, bytes):
        return [FieldError(f"{_F}{Key.SOURCE_LIST}", "a list of node ids and a list of "
                           "ciphertexts", f"{_kind(cfg.get(Key.SOURCE_LIST))}, "
                           f"{_kind(ctxts)}", _OFF_PROTOCOL)]
    errs = []
    if len(srcs) != len(ctxts):
        errs.append(FieldError(f"{_F}{Key.CIPHERTEXT_LIST}", f"one per source ({len(srcs)})",
                               str(len(ctxts)), _OFF_PROTOCOL))
    nid = _int(state, "nid")
    peers = {p for p in _ids(state.get("public_keys_dict:K")) if p != nid}
    errs += _unknown_or_repeated(Key.SOURCE_LIST, srcs, peers)
    t = _int(state, Key.THRESHOLD)
    if len(srcs) + 1 < t:
        errs.append(FieldError(f"{_F}{Key.SOURCE_LIST}", f">= {t - 1} other sites "
                               f"(threshold {t}, this site included)", str(len(srcs)),
                               _OFF_PROTOCOL))
    return errs


def _check_unmask(cfg: ConfigRecord, state: ConfigRecord) -> list[FieldError]:
    active = _int_list(cfg.get(Key.ACTIVE_NODE_ID_LIST))
    dead = _int_list(cfg.get(Key.DEAD_NODE_ID_LIST))
    if active is None or dead is None:
        return [FieldError(f"{_F}{Key.ACTIVE_NODE_ID_LIST}", "two lists of node ids "
                           "(active, dropped)", f"{_kind(cfg.get(Key.ACTIVE_NODE_ID_LIST))}, "
                           f"{_kind(cfg.get(Key.DEAD_NODE_ID_LIST))}", _OFF_PROTOCOL)]
    errs = []
    both = sorted(set(active) & set(dead))
    if both:
        errs.append(FieldError(f"{_F}{Key.DEAD_NODE_ID_LIST}", "no node also listed as "
                               "active (it would give away both its mask seed and its mask "
                               "key)", f"{both} in both lists", _OFF_PROTOCOL))
    nid = _int(state, "nid")
    if nid not in active or nid in dead:
        errs.append(FieldError(f"{_F}{Key.ACTIVE_NODE_ID_LIST}", f"this site ({nid}) listed "
                               "as active, not dropped: it sent its masked vector",
                               "active" if nid in active else "not active", _OFF_PROTOCOL))
    errs += _unknown_or_repeated(Key.ACTIVE_NODE_ID_LIST, active,
                                 set(_ids(state.get("rd_seed_share_dict:K"))))
    errs += _unknown_or_repeated(Key.DEAD_NODE_ID_LIST, dead,
                                 set(_ids(state.get("sk1_share_dict:K"))))
    n, t = len(_ids(state.get("public_keys_dict:K"))), _int(state, Key.THRESHOLD)
    if len(active) < t:
        errs.append(FieldError(f"{_F}{Key.ACTIVE_NODE_ID_LIST}", f">= threshold ({t}) "
                               "active sites", str(len(active)), _OFF_PROTOCOL))
    if len(dead) > n - t:
        errs.append(FieldError(f"{_F}{Key.DEAD_NODE_ID_LIST}", f"at most {n - t} dropped "
                               f"sites ({n} sites hold shares, threshold {t})",
                               str(len(dead)), _OFF_PROTOCOL))
    return errs


def _unknown_or_repeated(key: str, ids: list[int], known: set[int]) -> list[FieldError]:
    errs = []
    unknown = sorted({i for i in ids if i not in known})
    if unknown:
        errs.append(FieldError(f"{_F}{key}", f"nodes this site shared with ({sorted(known)})",
                               str(unknown), _OFF_PROTOCOL))
    if len(set(ids)) != len(ids):
        errs.append(FieldError(f"{_F}{key}", "each node once", str(ids), _OFF_PROTOCOL))
    return errs


def _is_list(v: ConfigRecordValues | None, kind: type, *, size: int | None = None) -> bool:
    return (isinstance(v, list) and (size is None or len(v) == size)
            and all(type(x) is kind for x in v))


def _int_list(v: ConfigRecordValues | None) -> list[int] | None:
    """``v`` as node ids, or None when it is not a list of integers."""
    if not isinstance(v, list):
        return None
    out = [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return out if len(out) == len(v) else None


def _ids(v: ConfigRecordValues | None) -> list[int]:
    return _int_list(v) or []


def _int(rec: ConfigRecord, key: str) -> int:
    v = rec.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _num(rec: ConfigRecord, key: str) -> float:
    v = rec.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def _kind(v: object) -> str:
    if isinstance(v, Iterable) and not isinstance(v, str | bytes):
        return f"{type(v).__name__} of {len(list(v))}"
    return "missing" if v is None else type(v).__name__
