"""The report in a real browser: Debian's chromium, driven by Playwright, opens the pages from file://.

Never a downloaded browser. Skipped with a reason when /usr/bin/chromium or Playwright is missing
(``apt-get install chromium`` and ``pip install playwright``; no ``playwright install``).
The README's screenshot is taken by ``docs/screenshot.py``, not by a test.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from dct_audit import report
from dct_audit.testing import add_analysis, build_tiny_run, hostile_run, synthetic_run, with_unfinished

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PAYLOAD = (
    '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
    '"\'><svg onload="window.__pwned=3"></svg>&amp; {{ 7*7 }}'
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs Playwright for Python (pip install playwright)"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tiny_pipelines, tiny_classifier, tiny_clip, tmp_path_factory):
    """The tiny run with unfinished classes and analysis files, rendered; returns the index path."""
    run = build_tiny_run(tmp_path_factory, tiny_pipelines, tiny_classifier, tiny_clip)
    run = with_unfinished(run, tmp_path_factory.mktemp("browser") / "run")
    add_analysis(run)
    return report.render_report(run)


def open_page(browser, path: Path):
    """A page loaded from disk, and the list its console errors and uncaught exceptions go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, errors


BROKEN_IMAGES = "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 120))"


def test_pages_load_without_errors_and_every_image_loads(browser, site):
    for path in [site, *sorted((site.parent / "classes").glob("*.html"))]:
        page, errors = open_page(browser, path)
        n_images = page.locator("img").count()
        assert page.eval_on_selector_all("img", BROKEN_IMAGES) == [], path.name
        assert errors == [], path.name
        assert n_images >= (0 if path == site else 8 + 2 + 2)  # grids, plots, evolution
        page.close()


def test_every_link_resolves(browser, site):
    page, _ = open_page(browser, site)
    class_pages = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
    page.close()
    assert len({u for u in class_pages if u.endswith(".html")}) == 3  # the index and two class pages
    for url in [site.resolve().as_uri(), *class_pages]:
        page, errors = open_page(browser, Path(url.removeprefix("file://")))
        for href in page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)"):
            assert href.startswith("file://"), href
            target = href.removeprefix("file://")
            path, _, anchor = target.partition("#")
            assert Path(unquote(path)).exists(), href
            if anchor:
                assert page.locator(f"#{anchor}").count() == 1, href
        assert errors == []
        page.close()


def test_sorting_reorders_rows_of_1000_classes(
    browser, tiny_pipelines, tiny_classifier, tiny_clip, tmp_path_factory
):
    tiny = build_tiny_run(tmp_path_factory, tiny_pipelines, tiny_classifier, tiny_clip)
    run = synthetic_run(
        tiny, tmp_path_factory.mktemp("sort") / "big", [(i, f"class {i}") for i in range(1000)]
    )
    index = report.render_index(report.read_run(run, run / "report"), run / "report")
    page, errors = open_page(browser, index)
    column = "#classes tbody tr td:nth-child(5)"  # token accuracy

    def values():
        return [float(v) for v in page.eval_on_selector_all(column, "cs => cs.map(c => c.dataset.sort)")]

    original = values()
    assert len(original) == 1000 and original != sorted(original)

    page.get_by_role("button", name="token acc").click()
    assert values() == sorted(original)
    assert page.locator("th[aria-sort=ascending]").inner_text().startswith("token acc")
    page.get_by_role("button", name="token acc").click()
    assert values() == sorted(original, reverse=True)

    page.get_by_role("button", name="class", exact=True).click()
    names = page.eval_on_selector_all(
        "#classes tbody tr td:nth-child(2)", "cs => cs.map(c => c.textContent.trim())"
    )
    in_order = page.evaluate("ns => ns.every((n, i) => i === 0 || ns[i - 1].localeCompare(n) <= 0)", names)
    assert in_order and sorted(names) == sorted(f"class {i}" for i in range(1000))

    page.get_by_placeholder("filter classes by name").fill("class 99")
    assert page.locator("#classes tbody tr:not([hidden])").count() == 11  # class 99 and class 990 to 999
    assert errors == []


def test_hostile_class_names_do_not_execute_or_inject(
    browser, tiny_pipelines, tiny_classifier, tiny_clip, tmp_path_factory
):
    tiny = build_tiny_run(tmp_path_factory, tiny_pipelines, tiny_classifier, tiny_clip)
    run = hostile_run(tiny, tmp_path_factory.mktemp("hostile") / "run", PAYLOAD)
    index = report.render_report(run)
    single = report.render_report(run, run / "shared", self_contained=True)
    class_page = next((index.parent / "classes").glob("*.html"))
    for path in (index, class_page, single):
        page, errors = open_page(browser, path)
        assert page.evaluate("window.__pwned") is None, path.name
        assert page.locator("img[src='x'], svg, [onerror], [onload]").count() == 0, path.name
        assert page.locator("script").count() == 1, path.name  # ours
        assert PAYLOAD in page.locator("body").inner_text(), path.name  # shown as text
        assert page.eval_on_selector_all("img", BROKEN_IMAGES) == [], path.name  # plots with hostile labels
        assert errors == [], path.name
        page.close()
