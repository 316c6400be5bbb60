"""A run report: metrics per round and per site as PNG plots, and one HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def _main_metric(rounds: list[dict[str, Any]]) -> str:
    held = next((r.get("heldout") for r in rounds if r.get("heldout")), None) or {}
    ev = next((r.get("evaluate") for r in rounds if r.get("evaluate")), None) or {}
    keys = set(held) | {k[4:] for k in ev if k.startswith("val-")}
    return "dice-mean" if "dice-mean" in keys else "accuracy"


def write_report(run_dir: Path) -> Path:
    """Write ``report/rounds.png``, ``sites.png``, ``cross_site.png`` (when present) and
    ``report/index.html`` for a run directory; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds: list[dict[str, Any]] = metrics["rounds"]
    card_path = run_dir / "final" / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    key = _main_metric(rounds)
    xs = [r["round"] for r in rounds]

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    held = [(r["round"], (r.get("heldout") or {}).get(key)) for r in rounds]
    held = [(x, y) for x, y in held if y is not None]
    if held:
        ax[0].plot(*zip(*held, strict=True), "o-", label=f"held-out {key}")
    fed = [(r["round"], (r.get("evaluate") or {}).get(f"val-{key}")) for r in rounds]
    fed = [(x, y) for x, y in fed if y is not None]
    if fed:
        ax[0].plot(*zip(*fed, strict=True), "s--", label=f"sites' validation {key}")
    ax[0].set(xlabel="round", ylabel=key, title="global model")
    ax[0].legend()
    loss = [(r["round"], (r.get("train") or {}).get("train-loss")) for r in rounds]
    loss = [(x, y) for x, y in loss if y is not None]
    if loss:
        ax[1].plot(*zip(*loss, strict=True), "o-")
    ax[1].set(xlabel="round", ylabel="train loss", title="aggregated local training loss")
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=100)
    plt.close(fig)

    sites = sorted({s for r in rounds for s in (r.get("evaluate_sites") or {})})
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in sites:
        pts = [(r["round"], r["evaluate_sites"][s].get(f"val-{key}")) for r in rounds
               if s in (r.get("evaluate_sites") or {})]
        ax[0].plot(*zip(*pts, strict=True), "o-", label=s)
        tl = [(r["round"], r["train_sites"][s].get("train-loss")) for r in rounds
              if s in (r.get("train_sites") or {})]
        if tl:
            ax[1].plot(*zip(*tl, strict=True), "o-", label=s)
    ax[0].set(xlabel="round", ylabel=f"validation {key}", title="per site: global model")
    ax[1].set(xlabel="round", ylabel="train loss", title="per site: local training")
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    fig.savefig(out / "sites.png", dpi=100)
    plt.close(fig)

    cross: dict[str, dict[str, dict[str, float]]] = card.get("cross_site") or {}
    cross_html = ""
    models = list(cross)
    cols = sorted({s for m in cross.values() for s in m})
    if cross and not cols:
        cross_html = (f"<h2>Cross-site validation ({html.escape(key)})</h2>"
                      "<p>No site answered the cross-site validation.</p>")
    if cols:
        grid = [[(cross[m].get(s) or {}).get(key) for s in cols] for m in models]
        fig, ax1 = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.6 * len(models)))
        ax1.imshow([[v if v is not None else float("nan") for v in row] for row in grid],
                   cmap="viridis", vmin=0, vmax=1)
        ax1.set_xticks(range(len(cols)), cols)
        ax1.set_yticks(range(len(models)), models)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax1.text(j, i, "-" if v is None else f"{v:.3f}", ha="center", va="center",
                         color="w")
        ax1.set(xlabel="evaluated on site", ylabel="model", title=f"cross-site {key}")
        fig.tight_layout()
        fig.savefig(out / "cross_site.png", dpi=100)
        plt.close(fig)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            f"<tr><th>{html.escape(m)}</th>" + "".join(
                f"<td>{'-' if v is None else f'{v:.3f}'}</td>" for v in row) + "</tr>"
            for m, row in zip(models, grid, strict=True))
        cross_html = (f"<h2>Cross-site validation ({html.escape(key)})</h2><table><tr><th>"
                      f"model \\\\ site</th>{head}</tr>{body}</table>"
                      '<img src="cross_site.png" alt="cross-site matrix">')

    personal_html = _personalization_html(metrics.get("personalization") or {}, key)
    task = metrics.get("task", {})
    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{_fmt((r.get('heldout') or {}).get(key))}</td>"
        f"<td>{_fmt((r.get('evaluate') or {}).get(f'val-{key}'))}</td>"
        f"<td>{_fmt((r.get('train') or {}).get('train-loss'))}</td>"
        f"<td>{len(r.get('train_sites') or {})}</td>{_timing_cells(r)}</tr>" for r in rounds)
    site_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>"
                        for k, v in sorted((card.get("sites") or {}).items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>fedpacs run report: {html.escape(str(task.get('name', '')))}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>fedpacs run report</h1>
<p>Task <b>{html.escape(str(task.get('name')))}</b> ({html.escape(str(task.get('kind')))},
network {html.escape(str(task.get('network')))}), strategy
{html.escape(str(card.get('strategy', '-')))}, {len(xs) - 1} rounds.</p>
<h2>Per round</h2><table><tr><th>round</th><th>held-out {key}</th>
<th>sites' validation {key}</th><th>train loss</th><th>sites</th><th>round s</th>
<th>exchanges</th><th>slowest site training s</th><th>overhead</th></tr>{rows}</table>
<img src="rounds.png" alt="metrics per round"><h2>Per site</h2>
<table><tr><th>site</th><th>training samples</th></tr>{site_rows}</table>
<img src="sites.png" alt="metrics per site">{cross_html}{personal_html}
</body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _personalization_html(personal: dict[str, Any], key: str) -> str:
    """The fine-tuning after the federation: each site's validation ``key`` before and
    after, and their means ("" when the run did none)."""
    if not personal:
        return ""
    metric = f"val-{key}"
    before, after = personal.get("before") or {}, personal.get("after") or {}
    sites = sorted(set(before.get("sites") or {}) | set(after.get("sites") or {}))

    def cell(phase: dict[str, Any], site: str | None) -> str:
        values = (phase.get("mean") if site is None else (phase.get("sites") or {}).get(site))
        return f"<td>{_fmt((values or {}).get(metric))}</td>"

    rows = "".join(f"<tr><td>{html.escape(s)}</td>{cell(before, s)}{cell(after, s)}</tr>"
                   for s in sites)
    rows += f"<tr><th>mean</th>{cell(before, None)}{cell(after, None)}</tr>"
    return (f"<h2>Personalisation ({html.escape(str(personal.get('method')))}, "
            f"{html.escape(str(personal.get('epochs')))} epoch(s))</h2><table><tr><th>site</th>"
            f"<th>validation {html.escape(key)}: global model</th><th>fine-tuned</th></tr>"
            f"{rows}</table>")


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _timing_cells(r: dict[str, Any]) -> str:
    """Round seconds, exchanges, the slowest site's training and the overhead share."""
    t = r.get("timing") or {}
    if not t:
        return "<td>-</td>" * 4
    share = t.get("overhead_fraction")
    return (f"<td>{t.get('round_s', 0):.1f}</td><td>{len(t.get('exchanges') or [])}</td>"
            f"<td>{t.get('slowest_train_s', 0):.1f}</td>"
            f"<td>{'-' if share is None else f'{100 * share:.0f} %'}</td>")
