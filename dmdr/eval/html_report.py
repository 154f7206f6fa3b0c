"""``dmdr report RUN``: one self-contained HTML page of a run (works offline: inline SVG and JS, data URIs).

What it reads from the run directory (all optional except ``metrics.jsonl``):

* ``metrics.jsonl`` — training lines (``loss_*``, ``reward_*``, ...), evaluation lines (``eval_*``), monitor
  lines (``monitor_<check>``), alarm lines (``alarm``), rollback lines (``rollback``);
* ``samples/step-*.png`` and ``samples/final.png`` — the sample grids over time (a slider and a strip);
* ``*.json`` directly in the run directory holding a flat (or one-level nested) mapping of numbers — eval
  results such as ``dmdr eval --json`` output — shown as tables;
* ``recipe.yaml`` — the resolved recipe, shown verbatim.

Sections: curves (losses, rewards, monitors with alarm markers and thresholds, evaluation), alarms, eval tables,
sample grids, recipe. Curves are SVG ``<path>`` elements drawn here (no plotting library). A small script sets
``<body data-report-status="ok" data-images-loaded=N data-paths=N data-js-errors="...">`` once the page has
loaded, which is what ``tests/test_report.py`` checks in headless Chromium.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from dmdr.train.runtime import read_metrics

W, H, PAD = 360, 170, 50
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int):
        return str(v)
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


def series(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) pairs of ``key`` over the records that have a finite value for it."""
    return [(float(r["step"]), float(r[key])) for r in records if "step" in r and _finite(r.get(key))]


def svg_chart(title: str, lines: dict[str, list[tuple[float, float]]], *, marks: list[float] = ()) -> str:
    """One SVG line chart: ``lines`` = {label: [(x, y), ...]}; ``marks``: x positions of red alarm lines."""
    pts = [p for s in lines.values() for p in s]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (W - PAD - 8)

    def sy(y):
        return H - 22 - (y - y0) / (y1 - y0) * (H - 22 - 18)

    parts = [f'<svg class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">',
             f'<text x="{PAD}" y="12" class="t">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - 22}" x2="{W - 8}" y2="{H - 22}" class="ax"/>',
             f'<line x1="{PAD}" y1="18" x2="{PAD}" y2="{H - 22}" class="ax"/>',
             f'<text x="{PAD - 3}" y="22" class="l" text-anchor="end">{_fmt(y1)}</text>',
             f'<text x="{PAD - 3}" y="{H - 22}" class="l" text-anchor="end">{_fmt(y0)}</text>',
             f'<text x="{PAD}" y="{H - 8}" class="l">{_fmt(x0)}</text>',
             f'<text x="{W - 8}" y="{H - 8}" class="l" text-anchor="end">step {_fmt(x1)}</text>']
    for m in marks:
        if x0 <= m <= x1:
            parts.append(f'<line x1="{sx(m):.1f}" y1="18" x2="{sx(m):.1f}" y2="{H - 22}" class="alarm"/>')
    for i, (label, s) in enumerate(lines.items()):
        c = COLORS[i % len(COLORS)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(s))
        if len(s) == 1:
            d += f" l0.1,0"
        parts.append(f'<path d="{d}" fill="none" stroke="{c}" stroke-width="1.6" class="curve">'
                     f'<title>{html.escape(label)}</title></path>')
        parts.append(f'<text x="{W - 10}" y="{26 + 11 * i}" class="l" text-anchor="end" fill="{c}">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _grids(run: Path) -> list[tuple[str, Path]]:
    d = run / "samples"
    if not d.is_dir():
        return []
    steps = []
    for p in d.glob("*.png"):
        m = re.fullmatch(r"step-(\d+)", p.stem)
        if m:
            steps.append((int(m.group(1)), f"step {int(m.group(1))}", p))
    steps.sort()
    out = [(label, p) for _, label, p in steps]
    if (d / "final.png").exists():
        out.append(("final", d / "final.png"))
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _eval_tables(run: Path) -> list[tuple[str, dict]]:
    out = []
    for p in sorted(run.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict):
            flat = _flat(data)
            if flat:
                out.append((p.name, flat))
    return out


def _table(rows: list[list[str]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _group(keys: list[str], pred) -> list[str]:
    return [k for k in keys if pred(k)]


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of run directory ``run`` to ``out`` (default ``run/report.html``); returns the path.

    Raises ``ValueError`` (one line) when ``run`` is not a run directory (no ``metrics.jsonl``)."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run} is not a directory; pass a run directory (the --out of `dmdr train`)")
    if not (run / "metrics.jsonl").exists():
        raise ValueError(f"{run} has no metrics.jsonl; pass a run directory written by `dmdr train`")
    recs = read_metrics(run / "metrics.jsonl")
    out = Path(out) if out is not None else run / "report.html"
    train = [r for r in recs if not any(k.startswith(("eval_", "monitor_", "alarm", "rollback")) for k in r)]
    evals = [r for r in recs if any(k.startswith("eval_") for k in r)]
    mons = [r for r in recs if any(k.startswith("monitor_") for k in r)]
    alarms = [r for r in recs if "alarm" in r]
    rollbacks = [r for r in recs if "rollback" in r]
    tkeys = sorted({k for r in train for k, v in r.items() if _finite(v)})
    charts: list[tuple[str, str]] = []
    losses = _group(tkeys, lambda k: k.startswith("loss_"))
    if losses:
        charts.append(("losses", svg_chart("losses", {k[5:]: series(train, k) for k in losses})))
    rewards = _group(tkeys, lambda k: k.startswith("reward_") and k not in ("reward_nan_count", "reward_nan_total"))
    for k in rewards:
        charts.append(("rewards", svg_chart(k, {k: series(train, k)})))
    for k in _group(tkeys, lambda k: k in ("gen_grad_norm", "lambda_real", "clip_fraction", "kl_approx")):
        charts.append(("diagnostics", svg_chart(k, {k: series(train, k)})))
    alarm_steps: dict[str, list[float]] = {}
    for a in alarms:
        alarm_steps.setdefault(a["alarm"], []).append(float(a["step"]))
    thresholds = {a["alarm"]: a.get("alarm_threshold") for a in alarms}
    mkeys = sorted({k for r in mons for k in r if k.startswith("monitor_") and not k.endswith("_d")})
    for k in mkeys:
        name = k[8:]
        title = name + (f" (alarm: d > {_fmt(thresholds[name])})" if thresholds.get(name) is not None else "")
        charts.append(("monitors", svg_chart(title, {name: series(mons, k)}, marks=alarm_steps.get(name, []))))
    ekeys = sorted({k for r in evals for k, v in r.items() if k.startswith("eval_") and _finite(v)})
    for k in ekeys:
        charts.append(("evaluation", svg_chart(k, {k: series(evals, k)})))
    sections = []
    nav = []
    for group in ("losses", "rewards", "diagnostics", "monitors", "evaluation"):
        cs = [c for g, c in charts if g == group and c]
        if cs:
            sections.append(f'<h2 id="{group}">{group}</h2><div class="charts">{"".join(cs)}</div>')
            nav.append(group)
    # alarms
    if alarms or rollbacks:
        rows = [[_fmt(a["step"]), html.escape(a["alarm"]), html.escape(str(a.get("alarm_action"))),
                 _fmt(a.get("alarm_value")), _fmt(a.get("alarm_degradation")), _fmt(a.get("alarm_threshold"))]
                for a in alarms]
        rows += [[_fmt(r["step"]), html.escape(str(r["rollback"])), "rollback done",
                  f"to step {_fmt(r.get('rollback_to_step'))}", f"lr × {_fmt(r.get('lr_scale'))}", ""]
                 for r in rollbacks]
        sections.append('<h2 id="alarms">alarms</h2><p class="bad">' + f"{len(alarms)} alarm(s)</p>" +
                        _table(rows, ["step", "check", "action", "value", "degradation", "threshold"]))
    else:
        sections.append('<h2 id="alarms">alarms</h2><p class="ok">no alarm' +
                        ("" if mons else " (no monitor measurements in this run)") + "</p>")
    nav.append("alarms")
    # eval tables
    etabs = []
    if evals:
        rows = [[_fmt(r.get("step"))] + [_fmt(r.get(k, "")) for k in ekeys] for r in evals]
        etabs.append("<h3>evaluations during training</h3>" + _table(rows, ["step"] + ekeys))
    for name, flat in _eval_tables(run):
        etabs.append(f"<h3>{html.escape(name)}</h3>" + _table([[html.escape(k), _fmt(v)] for k, v in flat.items()],
                                                              ["metric", "value"]))
    if etabs:
        sections.append('<h2 id="eval">eval tables</h2>' + "".join(etabs))
        nav.append("eval")
    # sample grids
    grids = _grids(run)
    if grids:
        uris = [(label, _png_uri(p)) for label, p in grids]
        strip = "".join(f'<figure><img class="grid" src="{u}" alt="{html.escape(l)}"><figcaption>{html.escape(l)}'
                        f"</figcaption></figure>" for l, u in uris)
        last = len(uris) - 1
        sections.append(
            '<h2 id="samples">sample grids</h2>'
            f'<div><input id="slider" type="range" min="0" max="{last}" value="{last}"> '
            f'<span id="slabel">{html.escape(uris[-1][0])}</span></div>'
            f'<img id="current" class="grid big" src="{uris[-1][1]}" alt="current grid">'
            f'<div class="strip">{strip}</div>')
        nav.append("samples")
    recipe = (run / "recipe.yaml").read_text() if (run / "recipe.yaml").exists() else "(no recipe.yaml)"
    sections.append(f'<h2 id="recipe">resolved recipe</h2><pre>{html.escape(recipe)}</pre>')
    nav.append("recipe")
    last_step = max((r.get("step", 0) for r in recs if isinstance(r.get("step"), (int, float))), default=0)
    summary = (f"{len(train)} training lines, last step {_fmt(last_step)}; {len(evals)} evaluations; "
               f"{len(mons)} monitor measurements; {len(alarms)} alarm(s); {len(grids)} sample grid(s)")
    page = _PAGE.format(title=html.escape(f"dmdr report: {run.name}"), run=html.escape(str(run)),
                        summary=html.escape(summary),
                        nav=" · ".join(f'<a href="#{n}">{n}</a>' for n in nav), body="\n".join(sections))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:system-ui,-apple-system,sans-serif;margin:18px;color:#222;max-width:1200px}}
h1{{font-size:20px;margin:0 0 4px}} h2{{font-size:16px;border-bottom:1px solid #ddd;margin-top:22px}}
.charts{{display:flex;flex-wrap:wrap;gap:8px}} .chart{{border:1px solid #e4e4e4;background:#fff}}
.t{{font-size:11px;font-weight:600}} .l{{font-size:9px;fill:#555}} .ax{{stroke:#999;stroke-width:1}}
.alarm{{stroke:#d00;stroke-width:1.2;stroke-dasharray:3,2}}
table{{border-collapse:collapse;font-size:12px;margin:4px 0 10px}} td,th{{border:1px solid #ddd;padding:2px 6px;text-align:right}}
th{{background:#f4f4f4}} pre{{background:#f7f7f7;padding:8px;font-size:11px;overflow:auto}}
.grid{{image-rendering:pixelated;border:1px solid #ccc}} .big{{max-width:100%;margin:6px 0}}
.strip{{display:flex;gap:6px;overflow-x:auto}} .strip img{{height:90px}} figure{{margin:0;text-align:center;font-size:10px}}
.ok{{color:#080}} .bad{{color:#c00;font-weight:600}} .muted{{color:#777;font-size:12px}}
</style></head>
<body data-report-status="loading">
<h1>{title}</h1><div class="muted">{run}<br>{summary}</div><div>{nav}</div>
{body}
<script>
(function(){{
  var errors = [];
  window.addEventListener("error", function(e){{ errors.push(String(e.message || e)); document.body.dataset.jsErrors = errors.join(" | "); }});
  var slider = document.getElementById("slider");
  if (slider) {{
    var imgs = document.querySelectorAll(".strip img"), cur = document.getElementById("current"), lab = document.getElementById("slabel");
    slider.addEventListener("input", function(){{ var i = +slider.value; cur.src = imgs[i].src; lab.textContent = imgs[i].alt; }});
  }}
  function done(){{
    var imgs = Array.prototype.slice.call(document.images);
    var loaded = imgs.filter(function(i){{ return i.complete && i.naturalWidth > 0; }}).length;
    document.body.dataset.imagesTotal = imgs.length;
    document.body.dataset.imagesLoaded = loaded;
    document.body.dataset.paths = document.querySelectorAll("svg path.curve").length;
    document.body.dataset.jsErrors = errors.join(" | ");
    document.body.dataset.reportStatus = (errors.length === 0 && loaded === imgs.length) ? "ok" : "error";
  }}
  if (document.readyState === "complete") done(); else window.addEventListener("load", done);
}})();
</script>
</body></html>
"""

__all__ = ["build_report", "series", "svg_chart"]
