"""Rendering: the jinja2 environment (autoescaped), its number filters, and the page writer."""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import urllib.parse
from pathlib import Path

import jinja2
from markupsafe import Markup

from .. import __version__, rundir
from .plots import PLOT_VERSION, plot_enrichment, plot_training

ASSETS = ("report.css", "report.js")

# ----------------------------------------------------------------------------------------------------
# Render (jinja2, autoescaped)
# ----------------------------------------------------------------------------------------------------


def templates_dir() -> Path:
    """The templates, CSS and JS ship inside the package (``dct_audit/templates``), in a checkout and a wheel."""
    return Path(__file__).parent.parent / "templates"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=fmt_pct, num=fmt_num, pp=fmt_pp, duration=fmt_duration, sortkey=fmt_sortkey, value=fmt_value
    )
    return env


def fmt_pct(x, digits: int = 1) -> str:
    """0.734 -> '73.4%'; missing -> a dash."""
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def fmt_num(x, digits: int = 3) -> str:
    """A number with ``digits`` decimals (whole numbers as they are); missing -> a dash."""
    if x is None:
        return "–"
    if isinstance(x, int) or digits == 0:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def fmt_pp(x, digits: int = 0) -> str:
    """A difference of two rates in percentage points: 0.62 -> '+62 pp'."""
    return "–" if x is None else f"{100 * x:+.{digits}f} pp"


def fmt_duration(seconds) -> str:
    """7.8 -> '7.8 s', 192 -> '3 min 12 s', 7500 -> '2 h 05 min'."""
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_value(x) -> str:
    """A setting as a person reads it: text as is, lists and numbers as JSON, missing as a dash."""
    if x is None:
        return "–"
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)


def fmt_sortkey(x) -> str:
    """The value a sortable table cell sorts by: a plain number, or empty (sorted last)."""
    return "" if x is None else repr(float(x))


class Renderer:
    """Turns run-relative paths into URLs (or data URIs), writes plots, renders templates to files."""

    def __init__(self, out_dir: Path, self_contained: bool):
        self.out_dir = Path(out_dir)
        self.self_contained = self_contained
        self.env = environment()
        self.inline: dict[str, bytes] = {}  # plots kept in memory for a self-contained file

    def draw_plots(self, cls: dict) -> None:
        """Draw the class's plots; a plot whose data has not changed since the last render is reused."""
        wanted = {}
        if cls["history"]:
            wanted["training"] = (plot_training, (cls["history"], cls["best_update"]))
        if cls["enrichment"]:
            wanted["enrichment"] = (plot_enrichment, (cls["enrichment"],))
        for name, (draw, args) in wanted.items():
            key = json.dumps([__version__, PLOT_VERSION, args], sort_keys=True, default=str)
            path = f"classes/{cls['folder']}/{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.svg"
            cls["plots"][name] = path
            if self.self_contained:
                self.inline[path] = draw(*args)
            elif not (self.out_dir / path).is_file():
                svg = draw(*args)
                for old in (self.out_dir / path).parent.glob(f"{name}-*.svg"):
                    old.unlink()
                rundir.atomic_write(self.out_dir / path, lambda p, svg=svg: p.write_bytes(svg))

    def url_for(self, page_dir: str):
        """A function for templates: report-relative path -> URL as seen from ``page_dir``."""

        def url(path: str) -> str:
            if self.self_contained:
                return self._data_uri(path)
            return urllib.parse.quote(posixpath.relpath(path, page_dir or "."))

        return url

    def _data_uri(self, path: str) -> str:
        data = self.inline.get(path)
        if data is None:
            data = (self.out_dir / path).read_bytes()
        kind = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg"}.get(
            posixpath.splitext(path)[1].lower(), "application/octet-stream"
        )
        return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"

    def render(self, path: Path, template: str, **context) -> Path:
        page_dir = posixpath.dirname(Path(path).relative_to(self.out_dir).as_posix())
        assets = {
            name: Markup((templates_dir() / name).read_text(encoding="utf-8"))
            if self.self_contained
            else None
            for name in ASSETS
        }
        tpl = self.env.get_template(template)
        url = self.url_for(page_dir)
        context.update(url=url, assets=assets, self_contained=self.self_contained)
        return rundir.atomic_write(path, lambda p: tpl.stream(**context).dump(str(p), encoding="utf-8"))
