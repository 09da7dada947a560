"""The HTML compare report on two tiny runs: links resolve, no torch, user text escaped, and in a browser."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from dct_audit import rundir
from dct_audit.compare import compare
from dct_audit.report.compare import render_compare
from dct_audit.testing import parse

PAYLOAD = (
    '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
    '"\'><svg onload="window.__pwned=3"></svg>&amp; {{ 7*7 }}'
)
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def compared(tiny_classifier, tiny_run_options, tmp_path_factory):
    """Two tiny runs of the same classifier over two classes, compared; returns the compare folder."""
    import dct_audit

    out = tmp_path_factory.mktemp("cmp-runs")
    model = tiny_classifier[0]
    common = dict(tiny_run_options, out=str(out), n_images=2)
    a = dct_audit.run(f"file:{model}", "0,2", name="a", **common).run_dir
    # the same settings and seeds give the same run byte for byte (tests/test_shards.py), so run b is
    # a copy: the comparison of two runs of one classifier, without auditing it twice
    b = Path(shutil.copytree(a, out / "b"))
    compare(a, b, out / "cmp", cross_score=False)
    return out / "cmp"


@pytest.fixture(scope="module")
def rendered(compared):
    return render_compare(compared)


def _pages(index: Path) -> list[Path]:
    return [index, *sorted((index.parent / "compare_classes").glob("*.html"))]


def _check_links(index: Path) -> None:
    for page in _pages(index):
        for url in parse(page).urls():
            assert not url.startswith(("http:", "https:", "//", "/")), f"{page.name} fetches {url}"
            if url.startswith("#"):
                continue
            assert (page.parent / unquote(url)).exists(), f"{page.name}: {url}"


def test_index_and_class_pages_with_paired_grids_and_attributes(rendered):
    assert rendered.name == "compare_index.html"
    pages = _pages(rendered)
    assert [p.name for p in pages[1:]] == ["0000-american-lobster.html", "0002-horizontal-bar.html"]
    index = parse(rendered)
    links = [a["href"] for t, a in index.tags if t == "a" and a["href"].startswith("compare_classes/")]
    assert sorted(links) == [
        "compare_classes/0000-american-lobster.html",
        "compare_classes/0002-horizontal-bar.html",
    ]
    for page in pages[1:]:
        p = parse(page)
        imgs = [a["src"] for t, a in p.tags if t == "img"]
        assert len(imgs) == 4 and all("/images/token/c0_s" in s for s in imgs)
        assert sum("/a/classes/" in s for s in imgs) == sum("/b/classes/" in s for s in imgs) == 2
        assert p.headings == ["Token images: A vs B", "Attribute differences"]
        assert sum(t == "tr" for t, _ in p.tags) > 2  # attribute rows


def test_every_link_and_image_exists_on_disk(rendered, compared, tmp_path, monkeypatch):
    _check_links(rendered)
    # the runs' images sit outside the compare folder: links stay right however deep it is, from any cwd
    deep = tmp_path / "x" / "y" / "z" / "cmp"
    shutil.copytree(compared, deep)
    monkeypatch.chdir("/")
    index = render_compare(deep)
    _check_links(index)
    assert any("../" * 6 in u for u in parse(_pages(index)[1]).urls())


def test_renders_in_a_fresh_interpreter_without_torch(compared, tmp_path):
    target = tmp_path / "cmp"
    shutil.copytree(compared, target)
    code = (
        "import sys\n"
        "from dct_audit.report.compare import render_compare\n"
        f"render_compare({str(target)!r})\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    _check_links(target / "compare_index.html")


def hostile_compare(compared: Path, dest: Path, text: str) -> Path:
    """A copy of the comparison whose class names, first attribute, run A's contexts and labels are ``text``."""
    shutil.copytree(compared, dest / "cmp")
    data = json.loads((compared / "compare.json").read_text())
    run_a = dest / "a"
    shutil.copytree(data["run_a"]["path"], run_a)
    for scores in run_a.glob("classes/*/scores.csv"):
        with open(scores, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r.update(context=text, pred_name=text, prompt=f"{r['prompt']} {text}")
        with open(scores, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    data["run_a"]["path"] = str(run_a)
    data["run_a"]["classifier"] = text
    for c in data["classes"]:
        c["class_name"] = f"{text} {c['class_index']}"
    rundir.write_json(dest / "cmp" / "compare.json", data)
    with open(compared / "attributes.csv", newline="", encoding="utf-8") as f:
        attrs = list(csv.DictReader(f))
    attrs[0]["attribute"] = text
    with open(dest / "cmp" / "attributes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(attrs[0]))
        w.writeheader()
        w.writerows(attrs)
    return dest / "cmp"


def test_user_text_is_escaped(compared, tmp_path):
    index = render_compare(hostile_compare(compared, tmp_path, PAYLOAD))
    benign = render_compare(hostile_compare(compared, tmp_path / "benign", "benign name"))
    for bad_path, good_path in zip(_pages(index), _pages(benign), strict=True):
        bad, good = parse(bad_path), parse(good_path)
        assert [t for t, _ in bad.tags] == [t for t, _ in good.tags]  # no element added or removed
        assert not any(k.startswith("on") for _, a in bad.tags for k in a)
        assert any(PAYLOAD in chunk for chunk in bad.texts)  # shown, as text
    _check_links(index)


# ----------------------------------------------------------------------------------------------------
# In a real browser (Debian's chromium via Playwright; skipped when either is missing)
# ----------------------------------------------------------------------------------------------------

BROKEN_IMAGES = "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 120))"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python")
    from test_report_browser import ARGS

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, errors


@pytest.mark.browser
def test_browser_pages_load_images_and_links(browser, rendered):
    for path in _pages(rendered):
        page, errors = open_page(browser, path)
        assert page.eval_on_selector_all("img", BROKEN_IMAGES) == [], path.name
        assert page.locator("img").count() == (0 if path == rendered else 4)
        for href in page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)"):
            assert href.startswith("file://") and Path(unquote(href[7:].partition("#")[0])).exists(), href
        assert errors == [], path.name
        page.close()


@pytest.mark.browser
def test_browser_sorting_and_hostile_text(browser, compared, tmp_path):
    # many rows: copies of the two classes under other indices (no page for those)
    data = json.loads((compared / "compare.json").read_text())
    rows = [
        dict(data["classes"][i % 2], class_index=100 + i, divergence=(i * 37) % 50 / 10) for i in range(50)
    ]
    data["classes"] = data["classes"] + rows
    shutil.copytree(compared, tmp_path / "many")
    rundir.write_json(tmp_path / "many" / "compare.json", data)
    page, errors = open_page(browser, render_compare(tmp_path / "many"))
    column = "#classes tbody tr td:nth-child({})"
    n_div = [
        th.strip() for th in page.eval_on_selector_all("#classes th", "ts => ts.map(t => t.textContent)")
    ]
    col = column.format(n_div.index("divergence") + 1)

    def values():
        return [float(v) for v in page.eval_on_selector_all(col, "cs => cs.map(c => c.dataset.sort)")]

    original = values()
    assert len(original) == 52 and original != sorted(original)
    page.get_by_role("button", name="divergence").click()
    assert values() == sorted(original)
    page.get_by_role("button", name="divergence").click()
    assert values() == sorted(original, reverse=True)
    assert errors == []
    page.close()

    index = render_compare(hostile_compare(compared, tmp_path / "hostile", PAYLOAD))
    for path in _pages(index):
        page, errors = open_page(browser, path)
        assert page.evaluate("window.__pwned") is None, path.name
        assert page.locator("img[src='x'], svg, [onerror], [onload]").count() == 0, path.name
        assert page.locator("script").count() == 1, path.name
        assert PAYLOAD in page.locator("body").inner_text(), path.name
        assert page.eval_on_selector_all("img", BROKEN_IMAGES) == [], path.name
        assert errors == [], path.name
        page.close()


def test_the_index_names_each_classs_flagged_attributes(compared, tmp_path):
    """Not only how many attributes differ, but which, with the direction (A's rate minus B's)."""
    import shutil

    import pandas as pd

    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    table = pd.read_csv(out / "attributes.csv")
    first = table.index[table["class_index"] == 0][0]
    table.loc[first, ["flagged", "diff"]] = [True, -0.5]
    table.to_csv(out / "attributes.csv", index=False)
    name = table.loc[first, "attribute"]
    text = " ".join(" ".join(parse(render_compare(out)).texts).split())
    assert f"{name} (A -50 pp)" in text
