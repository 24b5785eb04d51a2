"""Self-contained HTML pages: one report per slide and a run index.

Takes summaries (:func:`gpupath.report.summary.slide_summary` dicts), the run record's
parameters and environment, and image bytes; returns HTML text. Pages hold everything they show:
images are ``data:`` URIs, CSS is inline, there is no script and no external URL, and a
Content-Security-Policy forbids any (``default-src 'none'``), so a page opened from disk, mail or
an archive shows the same thing and fetches nothing.

Every string that comes from a slide or a run (paths, vendor, metadata values, which are free
text in slide files, errors, warnings, parameters, label names) is escaped with
:func:`html.escape` (``quote=True``) on its way into the page, in text and attributes alike.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gpupath._version import __version__
from gpupath.report.colours import label_colours

__all__ = ["slide_report_html", "index_html", "escape"]

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:16px 24px;color:#1b1b1b;
background:#fff;font-size:14px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px;border-bottom:1px solid #ddd;padding-bottom:2px}
table{border-collapse:collapse;margin:4px 0}th,td{border:1px solid #d4d4d4;padding:3px 8px;vertical-align:top;
text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.muted{color:#666}.path{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.warn{background:#fff6d6;border:1px solid #e8cf6a;padding:6px 10px;margin:8px 0}
.err{background:#fde8e8;border:1px solid #e49b9b;padding:6px 10px;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.row>div{min-width:300px}
figure{margin:0}figure img{max-width:100%;height:auto;border:1px solid #ccc;display:block}
figcaption{color:#555;font-size:13px;margin-top:4px;max-width:1024px}
pre,.pre{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
margin:0}pre.block{background:#f7f7f7;border:1px solid #e1e1e1;padding:8px;max-width:1100px}
.sw{display:inline-block;width:10px;height:10px;border:1px solid #555;margin-right:6px;vertical-align:middle}
img.thumb{max-width:160px;max-height:160px;display:block}
.ok{color:#17691f}.failed{color:#a30000;font-weight:600}
"""


def escape(value: Any) -> str:
    """Text or attribute-safe HTML for any value (``None`` -> empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


_e = escape


def _num(value: Any, fmt: str = "{:,}", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    try:
        return fmt.format(value)
    except (TypeError, ValueError):  # not a number (a hand-edited run.json): show it as text
        return _e(value)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">\n'
            f'<meta name="referrer" content="no-referrer">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="gpupath {_e(__version__)}">\n'
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _kv_table(rows: Sequence[tuple[str, str]], *, table_id: str = "", pre: bool = False) -> str:
    """Two-column table; values are already HTML (escaped by the caller)."""
    attr = f' id="{_e(table_id)}"' if table_id else ""
    cls = ' class="pre"' if pre else ""
    body = "".join(f"<tr><th>{k}</th><td{cls}>{v}</td></tr>" for k, v in rows)
    return f"<table{attr}>{body}</table>"


def _json_block(obj: Any, block_id: str) -> str:
    return f'<pre class="block" id="{_e(block_id)}">{_e(json.dumps(obj, indent=2, default=str, sort_keys=True))}</pre>'


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "–"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _environment_rows(environment: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Versions and machine, one row each (nested dicts such as the detector are shown elsewhere)."""
    return [(_e(k), _e("not installed" if v is None else v)) for k, v in environment.items()
            if not isinstance(v, (dict, list))]


def _detector_rows(environment: Mapping[str, Any]) -> list[tuple[str, str]]:
    det = environment.get("detector") or {}
    rows = [("model", _e(det.get("model"))), ("engine", _e(det.get("engine"))),
            ("model sha256", f'<span class="path">{_e(det.get("model_sha256"))}</span>'),
            ("classes", _e(", ".join(map(str, det.get("classes") or [])))),
            ("preprocess", _e(det.get("preprocess")))]
    if det.get("tensorrt"):
        rows.append(("tensorrt", _e(json.dumps(det["tensorrt"], default=str))))
    rows += [("note", _e(n)) for n in det.get("notes") or []]
    executor = environment.get("executor")
    if executor:
        rows.append(("executor", _e(", ".join(f"{k}={v}" for k, v in executor.items()))))
    return rows


def _swatch(rgb: Any) -> str:
    """A colour square (the legend's mark) for an RGB triple."""
    r, g, b = (int(v) for v in rgb)
    return f'<span class="sw" style="background:rgb({r}, {g}, {b})"></span>'


def _colours_of(labels: Sequence[str], known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Label -> RGB: as the overlay recorded it (``known``), else by position (:func:`label_colours`)."""
    by_index = label_colours(list(labels))
    known = known if isinstance(known, Mapping) else {}
    return {name: known.get(name, by_index[name]) for name in labels}


def _mode_text(overlay: Mapping[str, Any], n_labels: int) -> str:
    mode = overlay.get("mode")
    if mode == "heatmap":
        top = overlay.get("heatmap_max_per_mm2")
        every = " of all classes together" if n_labels > 1 else ""
        return (f"Detections too dense to draw one by one: density heatmap{every} on "
                f"{overlay.get('heatmap_cell_px')}-px cells, colour scale 0 to {_num(top, '{:,.0f}')} per mm² "
                "(colour bar top right; per-class numbers in the Detections table).")
    if mode in ("boxes", "dots"):
        where = "legend top right and " if overlay.get("legend") else ""
        return (f"Each detection drawn as a {'box' if mode == 'boxes' else 'dot'} in its class's colour "
                f"({where}swatches in the Detections table).")
    return "No detections to draw."


def _counts_table(s: Mapping[str, Any], counts: Mapping[str, int], density: Mapping[str, Any],
                  colours: Mapping[str, Any]) -> str:
    """The slide's Detections table: one row per class (swatch, count, per mm² tissue) and the total."""
    count_rows = "".join(
        f'<tr data-label="{_e(label)}"><td>{_swatch(colours[label])}'
        f'{_e(label)}</td><td class="n" id="count-{i}">{_num(n)}</td>'
        f'<td class="n" id="density-{i}">{_num(density.get(label), "{:,.1f}")}</td></tr>'
        for i, (label, n) in enumerate(counts.items()))
    return (
        '<table id="counts"><tr><th>class</th><th class="n">detections</th><th class="n">per mm² tissue</th></tr>'
        f"{count_rows}<tr><th>all</th><th class=\"n\" id=\"n-detections\">{_num(s.get('n_detections'))}</th>"
        f"<th class=\"n\" id=\"density-total\">{_num(s.get('density_total_per_mm2'), '{:,.1f}')}</th></tr></table>")


def _slide_rows(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The slide's Slide table rows: status, tissue, tiles, resolutions, size, levels, vendor, reader, id."""
    w, h = s.get("width_px"), s.get("height_px")
    return [
        ("status", f'<span class="{_e(s.get("status"))}">{_e(s.get("status"))}</span>'
                   + (" (results of an earlier run, kept)" if s.get("resumed") else "")),
        ("tissue", f'<span id="tissue-mm2">{_num(s.get("tissue_mm2"), "{:,.3f}")}</span> mm²'),
        ("tiles", f'<span id="n-tiles">{_num(s.get("n_tiles"))}</span>'),
        ("tile resolution", f"{_num(s.get('tile_mpp'), '{:.4g}')} µm/px"),
        ("level-0 resolution", f"{_num(s.get('mpp'), '{:.4g}')} µm/px"),
        ("level-0 size", f"{_num(w)} × {_num(h)} px"),
        ("levels", _num(s.get("level_count"))),
        ("vendor", _e(s.get("vendor"))), ("read by", _e(s.get("backend"))),
        ("slide id (sha256)", f'<span class="path">{_e(s.get("slide_id"))}</span>'),
    ]


def _timing_table(s: Mapping[str, Any]) -> str:
    """The slide's Time per stage table: seconds per stage, then the slide's total."""
    timings: Mapping[str, Any] = s.get("timings_s") or {}
    timing_rows = "".join(f'<tr><td>{_e(k)}</td><td class="n">{_num(v, "{:.3f}")}</td></tr>'
                          for k, v in timings.items())
    return (f'<table id="timings"><tr><th>stage</th><th class="n">seconds</th></tr>{timing_rows}'
            f'<tr><th>slide total</th><th class="n">{_num(s.get("seconds"), "{:.3f}")}</th></tr></table>')


def _overlay_figure(overlay_png: bytes | None, ov: Mapping[str, Any], name: str, n_labels: int) -> str:
    """The overlay image (a data URI) with its caption, or a note when there is no image."""
    if overlay_png is None:
        return '<p class="muted" id="overlay-missing">No overlay image.</p>'
    alt = f"Overlay of {name}: detections, tissue outline and scale bar on the slide thumbnail"
    size = (f' width="{int(ov["width_px"])}" height="{int(ov["height_px"])}"'
            if isinstance(ov.get("width_px"), int) and isinstance(ov.get("height_px"), int) else "")
    return (f'<figure><img id="overlay" src="{_data_uri(overlay_png, "image/png")}"{size} '
            f'alt="{_e(alt)}"><figcaption>{_e(_mode_text(ov, n_labels))} '
            + ("Tissue outline in blue. " if ov.get("tissue_outline") else "")
            + (f"Scale bar: {_e(ov.get('scale_bar_label'))}. " if ov.get("scale_bar_label") else "")
            + (f"<b>{_e(ov.get('note'))}</b>" if ov.get("note") else "") + "</figcaption></figure>")


def _metadata_html(meta: Mapping[str, Any] | None) -> str:
    """The slide's metadata table, or a note when it could not be read (None) or is empty."""
    if meta is None:
        return '<p class="muted">The slide file could not be read while this report was made.</p>'
    if not meta:
        return '<p class="muted">No metadata.</p>'
    return _kv_table([(_e(k), _e(v)) for k, v in meta.items()], table_id="metadata", pre=True)


def slide_report_html(summary: Mapping[str, Any], *, overlay_png: bytes | None, params: Mapping[str, Any],
                      environment: Mapping[str, Any], run: Mapping[str, Any] | None = None,
                      index_href: str = "../index.html") -> str:
    """One slide's report page.

    Parameters
    ----------
    summary : the slide's summary (:func:`gpupath.report.summary.slide_summary`).
    overlay_png : the overlay image, embedded as a data URI (None: a note instead).
    params : the run's parameters (run.json ``params``).
    environment : the run's environment (run.json ``environment``: versions, device, detector).
    run : the run record, for its start time (optional).
    index_href : link back to the run index (relative).

    Returns
    -------
    The HTML text (UTF-8 when written).
    """
    s = summary
    name = s.get("file_name") or s.get("slide_id") or "slide"
    counts: Mapping[str, int] = s.get("counts") or {}
    density: Mapping[str, Any] = s.get("density_per_mm2") or {}
    ov: Mapping[str, Any] = s.get("overlay") or {}
    colours = _colours_of(list(counts), ov.get("class_colours"))
    counts_table = _counts_table(s, counts, density, colours)
    slide_rows = _slide_rows(s)
    timing_table = _timing_table(s)
    figure = _overlay_figure(overlay_png, ov, name, len(counts))
    notes = "".join(f'<div class="warn">{_e(n)}</div>' for n in [s.get("warning"), *(s.get("notes") or [])] if n)
    meta_html = _metadata_html(s.get("slide_metadata"))
    started = f" · run started {_when(run.get('started'))}" if run else ""
    body = f"""<p><a href="{_e(index_href)}">← run index</a></p>
<h1 id="slide-name">{_e(name)}</h1>
<p class="path" id="slide-path">{_e(s.get("path"))}</p>
<p class="muted">gpupath {_e(s.get("gpupath_version") or __version__)}{started}</p>
{notes}
<div class="row"><div>
<h2>Detections</h2>{counts_table}
<h2>Slide</h2>{_kv_table(slide_rows, table_id="slide")}
<h2>Time per stage</h2>{timing_table}
</div><div>
<h2>Overlay</h2>{figure}
</div></div>
<h2>Slide metadata</h2>{meta_html}
<h2>Detector</h2>{_kv_table(_detector_rows(environment), table_id="detector")}
<h2>Parameters</h2>{_json_block(params, "params")}
<h2>Environment</h2>{_kv_table(_environment_rows(environment), table_id="environment")}"""
    return _page(f"{name} – gpupath report", body)


def _index_labels(env: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The index's class columns: the detector's classes, then any other label a slide counted, in
    order of first appearance; none when there are fewer than two (one column would repeat "detections")."""
    label_names: list[str] = list((env.get("detector") or {}).get("classes") or [])
    for row in rows:
        for label in ((row.get("summary") or {}).get("counts") or {}):
            if label not in label_names:
                label_names.append(label)
    if len(label_names) < 2:
        label_names = []  # one label: its column would repeat "detections"
    return label_names


def _overlay_colours(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Label -> RGB the overlays were drawn in (the first slide that recorded a label wins)."""
    known: dict[str, Any] = {}
    for row in rows:  # the colours the overlays were drawn in
        for label, rgb in (((row.get("summary") or {}).get("overlay") or {}).get("class_colours") or {}).items():
            known.setdefault(label, rgb)
    return known


def _slide_line(i: int, row: Mapping[str, Any], label_names: Sequence[str]) -> str:
    """One slide's row of the index's Slides table (thumbnail, link, status, counts, numbers, problem)."""
    r: Mapping[str, Any] = row.get("result") or {}
    s: Mapping[str, Any] = row.get("summary") or {}
    name = _e(_file_name(str(r.get("path", ""))))
    link = f'<a href="{_e(row["report_href"])}">{name}</a>' if row.get("report_href") else name
    thumb = (f'<img class="thumb" src="{_data_uri(row["thumb_jpeg"], "image/jpeg")}" alt="thumbnail of {name}">'
             if row.get("thumb_jpeg") else "")
    status = _e(r.get("status")) + (" (resumed)" if r.get("resumed") else "")
    counts = s.get("counts") or {}
    density = s.get("density_per_mm2") or {}
    cells = "".join(f'<td class="n">{_num(counts.get(label)) if s else "–"}'
                    + (f'<div class="muted">{_num(density.get(label), "{:,.0f}")} /mm²</div>'
                       if s and density.get(label) is not None else "") + "</td>"
                    for label in label_names)
    n_det = s.get("n_detections", r.get("n_detections")) if r.get("status") == "ok" else None
    problem = r.get("error") or r.get("warning") or ""
    if row.get("report_error"):
        problem = f"{problem}; " if problem else ""
        problem += f"report not made: {row['report_error']}"
    return (
        f'<tr id="slide-{i}"><td>{thumb}</td><td>{link}<div class="path muted">{_e(r.get("path"))}</div></td>'
        f'<td class="{_e(r.get("status"))}">{status}</td><td class="n">{_num(n_det)}</td>{cells}'
        f'<td class="n">{_num(s.get("density_total_per_mm2"), "{:,.0f}")}</td>'
        f'<td class="n">{_num(r.get("tissue_mm2"), "{:,.2f}")}</td><td class="n">{_num(r.get("n_tiles"))}</td>'
        f'<td class="n">{_num(r.get("seconds"), "{:,.1f}")}</td><td class="pre">{_e(problem)}</td></tr>')


def _slides_table(rows: Sequence[Mapping[str, Any]], label_names: Sequence[str], colours: Mapping[str, Any]) -> str:
    """The index's Slides table: a header with one swatched column per class, then one row per slide."""
    head = "".join(f'<th class="n" data-label="{_e(label)}">{_swatch(colours[label])}{_e(label)}</th>'
                   for label in label_names)
    lines = [_slide_line(i, row, label_names) for i, row in enumerate(rows)]
    return (f'<table id="slides"><tr><th></th><th>slide</th><th>status</th><th class="n">detections</th>{head}'
            '<th class="n">per mm²</th><th class="n">tissue mm²</th><th class="n">tiles</th>'
            f'<th class="n">seconds</th><th>error / warning</th></tr>{"".join(lines)}</table>')


def _failed_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The index's Failed slides table (path and error of each slide not ``ok``), or "None."."""
    failed = [row.get("result") or {} for row in rows if (row.get("result") or {}).get("status") != "ok"]
    if not failed:
        return '<p class="muted" id="failed">None.</p>'
    return ('<table id="failed"><tr><th>slide</th><th>reason</th></tr>'
            + "".join(f'<tr><td class="path">{_e(r.get("path"))}</td><td class="pre">{_e(r.get("error"))}'
                      "</td></tr>" for r in failed) + "</table>")


def _run_rows(run: Mapping[str, Any], env: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The index's run table rows: state and times, slide counts, tiles and rate, device, gpupath version."""
    state = "finished" if run.get("finished") else "in progress (or stopped before the end)"
    finished = f", finished {_when(run.get('finished'))}" if run.get("finished") else ""
    slides = (f"{_num(run.get('slides_total'))} total: <span id=\"n-ok\">{_num(run.get('slides_done'))}</span> ok, "
              f"<span id=\"n-failed\">{_num(run.get('slides_failed'))}</span> failed, "
              f"{_num(run.get('slides_resumed'))} resumed, {_num(run.get('slides_left'))} left")
    tiles = (f"{_num(run.get('tiles_done'))} in {_num(run.get('elapsed_s'), '{:,.1f}')} s "
             f"({_num(run.get('tiles_per_s'), '{:,.1f}')} tiles/s)")
    return [
        ("run", f"{_e(state)}; started {_when(run.get('started'))}{finished}"),
        ("slides", slides),
        ("tiles", tiles),
        ("device", f'<span id="device">{_e(env.get("device"))}</span>'),
        ("gpupath", _e(run.get("gpupath_version") or env.get("gpupath"))),
    ]


def index_html(run: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, title: str = "gpupath run") -> str:
    """The run overview page.

    Parameters
    ----------
    run : the run record (run.json).
    rows : one per slide, in run order: ``result`` (SlideResult dict), ``summary`` (dict or None),
        ``thumb_jpeg`` (bytes or None), ``report_href`` (relative link or None), ``report_error``
        (why its report could not be made, or "").
    title : the page heading (e.g. the run folder's name).

    Returns
    -------
    The HTML text.
    """
    env: Mapping[str, Any] = run.get("environment") or {}
    label_names = _index_labels(env, rows)
    colours = _colours_of(label_names, _overlay_colours(rows))
    slides_table = _slides_table(rows, label_names, colours)
    classes_html = _class_totals(rows, label_names, colours)
    failed_html = _failed_html(rows)
    run_rows = _run_rows(run, env)
    body = f"""<h1>{_e(title)}</h1>
<p class="muted">Report made by gpupath {_e(__version__)} on {_when(dt.datetime.now(dt.UTC).timestamp())}</p>
{_kv_table(run_rows, table_id="run")}
<h2>Slides</h2>{slides_table}
{classes_html}
<h2>Failed slides</h2>{failed_html}
<h2>Detector</h2>{_kv_table(_detector_rows(env), table_id="detector")}
<h2>Parameters</h2>{_json_block(run.get("params") or {}, "params")}
<h2>Environment</h2>{_kv_table(_environment_rows(env), table_id="environment")}"""
    return _page(f"{title} – gpupath", body)


def _class_totals(rows: Sequence[Mapping[str, Any]], label_names: Sequence[str], colours: Mapping[str, Any]) -> str:
    """Detections per class over the slides with a summary: count, and per mm² of their tissue; the
    colour swatch of each class is the legend of the overlays. Empty with fewer than two classes."""
    if not label_names:
        return ""
    summaries = [row["summary"] for row in rows if row.get("summary")]
    totals = {label: sum(int((sm.get("counts") or {}).get(label) or 0) for sm in summaries) for label in label_names}
    areas = [sm.get("tissue_mm2") for sm in summaries]
    tissue_mm2 = sum(a for a in areas if isinstance(a, (int, float)) and a > 0)

    def per_mm2(n: int) -> float | None:
        return n / tissue_mm2 if tissue_mm2 > 0 else None

    body = "".join(
        f'<tr data-label="{_e(label)}"><td>{_swatch(colours[label])}{_e(label)}</td>'
        f'<td class="n" id="class-count-{i}">{_num(n)}</td>'
        f'<td class="n" id="class-density-{i}">{_num(per_mm2(n), "{:,.1f}")}</td></tr>'
        for i, (label, n) in enumerate(totals.items()))
    n_all = sum(totals.values())
    return ('<h2>Detections per class</h2><table id="classes"><tr><th>class</th><th class="n">detections</th>'
            f'<th class="n">per mm² tissue</th></tr>{body}<tr><th>all ({len(summaries)} slide{"s" * (len(summaries) != 1)}, '
            f'{_num(tissue_mm2, "{:,.3f}")} mm² tissue)</th><th class="n">{_num(n_all)}</th>'
            f'<th class="n">{_num(per_mm2(n_all), "{:,.1f}")}</th></tr></table>')


def _file_name(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or path
