"""The HTML report: a real tiny run rendered offline, without torch; links resolve; user text is escaped.

The helpers at the top (a tiny run built once per session, analysis files, synthetic runs made of copies
of one class) are shared with ``test_report_browser.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dct_audit import report, rundir
from dct_audit.cli import main
from dct_audit.errors import DctAuditError
from dct_audit.testing import (
    add_analysis,
    hostile_run,
    parse,
    read_csv,
    synthetic_run,
    with_unfinished,
    write_csv,
)


@pytest.fixture(scope="module")
def rendered(tiny_run, tmp_path_factory):
    """The tiny run with an interrupted and a not-started class and analysis files, rendered."""
    run = with_unfinished(tiny_run, tmp_path_factory.mktemp("report") / "run")
    add_analysis(run)
    return report.render_report(run)


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------


def test_renders_index_class_pages_plots_and_json(rendered):
    """Index, a page per finished class with its plots and JSON, every optional section present."""
    out = rendered.parent
    assert rendered.name == "index.html" and out.name == "report" and out.parent.name == "run"
    data = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in data["classes"]] == ["done", "done", "unfinished", "unfinished"]
    for folder in ("0000-american-lobster", "0002-horizontal-bar"):
        page = parse(out / "classes" / f"{folder}.html")
        assert (out / "classes" / f"{folder}.json").is_file()
        for plot in ("training", "enrichment"):
            [svg] = (out / "classes" / folder).glob(f"{plot}-*.svg")
            assert svg.stat().st_size > 1000 and svg.read_bytes().startswith(b"<?xml")
        assert page.headings == [
            "Findings",
            "Generated images: with the token vs the baseline prompt",
            "Attribute enrichment",
            "Training",
            "Where the classifier looks",
            "The learned token",
        ]
        imgs = [a["src"] for tag, a in page.tags if tag == "img"]
        assert sum("/images/token/" in s for s in imgs) == sum("/images/baseline/" in s for s in imgs) == 4
        assert sum("/evolution/" in s for s in imgs) >= 2
        text = " ".join(page.texts)
        assert "load_textual_inversion(" in text and "<dct-" in text  # the snippet, as text
        assert "the classifier's confidence depends on it" in text and "+60 pp" in text
    index = " ".join(parse(rendered).texts)
    assert "plate +60 pp" in index and "stabilityai" not in index  # the tiny generator, as resolved
    assert "drawn with 5 other classes too" in index  # the association stage, as the manifest records it


def test_the_index_says_when_the_association_stage_was_off(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["analysis"].update(association=False, association_subjects=0)
    (run / "manifest.json").write_text(json.dumps(manifest))
    index = " ".join(parse(report.render_report(run)).texts)
    assert "off ( --no-association ): decided on the class's own images" in index
    assert "other classes too" not in index


def test_the_index_points_to_the_thorough_check_only_when_the_run_did_not_use_it(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    hint = "--adjust --confirm-max-seeds 32"
    assert hint in " ".join(parse(report.render_report(run)).texts)  # the tiny run: 2 seeds, unadjusted
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["analysis"].update(adjust=True, confirm_max_seeds=8)
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert hint not in " ".join(parse(report.render_report(run)).texts)


def test_report_imports_no_torch(rendered, tmp_path):
    """The report layer reads files only: rendering in a fresh interpreter never imports torch."""
    run = rendered.parent.parent
    code = (
        "import sys, dct_audit.report as r\n"
        f"r.render_report({str(run)!r}, {str(tmp_path / 'out')!r})\n"
        f"r.render_report({str(run)!r}, {str(tmp_path / 'one')!r}, self_contained=True)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "out" / "index.html").is_file()


def test_every_link_and_image_exists_on_disk(rendered):
    pages = [rendered, *sorted((rendered.parent / "classes").glob("*.html"))]
    assert len(pages) == 3
    for page in pages:
        for url in parse(page).urls():
            assert not url.startswith(("http:", "https:", "//")), f"{page.name} fetches {url}"
            if url.startswith("#"):
                continue
            assert (page.parent / unquote(url)).exists(), f"{page.name}: {url}"


def test_unfinished_classes_are_shown_as_unfinished_without_a_page(rendered):
    page = parse(rendered)
    rows = {}
    current = None
    for tag, attrs in page.tags:
        if tag == "tr" and "class" in attrs:
            current = attrs["class"]
            rows[current] = rows.get(current, 0) + 1
    assert rows == {"status-done": 2, "status-unfinished": 2}
    hrefs = {a["href"] for tag, a in page.tags if tag == "a" and a["href"].startswith("classes/")}
    assert hrefs == {"classes/0000-american-lobster.html", "classes/0002-horizontal-bar.html"}
    assert not (rendered.parent / "classes" / "0001-spiny-lobster.html").exists()
    notes = [a.get("title") for tag, a in page.tags if tag == "span" and "unfinished" in a.get("class", "")]
    assert notes == ["interrupted: no DONE marker", "not started"]


def test_a_damaged_finished_class_is_listed_as_broken_and_the_rest_renders(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "classes" / "0002-horizontal-bar" / "scores.csv").unlink()
    index = report.render_report(run)
    data = json.loads((index.parent / "report.json").read_text())
    assert [c["status"] for c in data["classes"]] == ["done", "broken"]
    assert "scores.csv is missing" in data["classes"][1]["note"] and data["classes"][1]["page"] is None
    assert (index.parent / "classes" / "0000-american-lobster.html").is_file()

    # a file changed since the class finished (checked against the DONE marker's hashes, as verify does): broken,
    # and `dct-audit report` says so; a report built from it would show numbers the run never made
    lobster = run / "classes" / "0000-american-lobster"
    (lobster / "history.csv").write_text("\x00garbage{")
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    data = json.loads((index.parent / "report.json").read_text())
    assert [c["status"] for c in data["classes"]] == ["broken", "broken"]
    assert "history.csv has changed since the class finished" in data["classes"][0]["note"]
    assert "class American lobster is broken (history.csv has changed" in capsys.readouterr().out


def test_a_class_without_history_rows_renders_without_a_training_plot(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    folder = run / "classes" / "0000-american-lobster"
    header = (folder / "history.csv").read_text().splitlines()[0]
    (folder / "history.csv").write_text(header + "\n")
    rundir.RunDir(run).mark_done(0, "american lobster")
    index = report.render_report(run)
    page = (index.parent / "classes" / "0000-american-lobster.html").read_text()
    assert "<h2>Training</h2>" in page and "loss and target probability over updates" not in page


def test_a_token_that_did_not_reach_the_stop_points_to_the_flags_the_run_did_not_use(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    path = run / "classes" / "0000-american-lobster" / "class.json"
    summary = rundir.read_json(path)
    manifest = rundir.read_json(run / "manifest.json")
    page = run / "report" / "classes" / "0000-american-lobster.html"
    shown = {}
    for stop, attempts, objective in (
        ("max_updates", 1, "ce"),
        ("patience", 2, "ce"),
        ("max_updates", 1, "meanprob"),
        ("max_updates", 2, "meanprob"),
        ("accuracy", 1, "ce"),
    ):
        settings = {**manifest["settings"], "objective": objective}
        rundir.write_json(run / "manifest.json", {**manifest, "settings": settings})
        rundir.write_json(path, {**summary, "stop_reason": stop, "attempts": attempts})
        rundir.RunDir(run).mark_done(0, "american lobster")
        report.render_report(run)
        text = " ".join(parse(page).texts)
        hint = re.search(r"did not reach the stop; \s*(.*?)\s* learns it again", text)
        shown[stop, attempts, objective] = (hint and hint.group(1), "in 2 attempts" in text)
    assert shown == {
        ("max_updates", 1, "ce"): ("--objective meanprob --attempts 2", False),
        ("patience", 2, "ce"): ("--objective meanprob", True),
        ("max_updates", 1, "meanprob"): ("--attempts 2", False),
        ("max_updates", 2, "meanprob"): (None, True),
        ("accuracy", 1, "ce"): (None, False),
    }


def test_token_not_learned_needs_a_missed_stop_and_no_gain_over_the_plain_prompt():
    cases = {  # stop reason, token accuracy, baseline accuracy -> not learned
        ("max_updates", 0.0, 0.0): True,  # a plateau
        ("patience", 0.1, 0.25): True,  # worse than the plain prompt
        ("max_updates", 0.5, 0.25): False,  # better, though short of the stop
        ("accuracy", 1.0, 1.0): False,  # reached the stop
        ("max_updates", None, 0.0): False,  # no numbers: nothing to say
        ("max_updates", float("nan"), 0.0): False,
    }
    for (stop, token, baseline), expected in cases.items():
        summary = {"stop_reason": stop, "token_accuracy": token, "baseline_accuracy": baseline}
        assert rundir.token_not_learned(summary) is expected, summary


def test_retry_flags_name_what_the_run_did_not_use_and_survive_a_damaged_summary():
    cases = {  # stop reason, attempts, objective -> flags
        ("patience", 1, "ce"): "--objective meanprob --attempts 2",
        ("max_updates", None, "meanprob"): "--attempts 2",  # written before --attempts: one attempt
        ("max_updates", "two", "meanprob"): "--attempts 2",  # damaged: as one attempt, no error
        ("max_updates", 2, None): "--objective meanprob",  # written before --objective: ce
        ("max_updates", 3, "meanprob"): None,
        ("accuracy", 1, "ce"): None,
        (None, 1, "ce"): None,
    }
    for (stop, attempts, objective), expected in cases.items():
        summary = {"stop_reason": stop, "attempts": attempts}
        assert rundir.retry_flags(summary, {"objective": objective}) == expected, (stop, attempts, objective)


def test_a_token_that_did_not_learn_is_marked_on_its_page_and_in_the_index(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    for other in sorted(run.glob("classes/*/class.json"))[1:]:  # the other classes reached the stop
        rundir.write_json(other, {**rundir.read_json(other), "stop_reason": "accuracy"})
        rundir.RunDir(run).mark_done(int(other.parent.name[:4]), rundir.read_json(other)["name"])
    path = run / "classes" / "0000-american-lobster" / "class.json"
    summary = rundir.read_json(path)
    page = run / "report" / "classes" / "0000-american-lobster.html"
    shown = {}
    for case, token in (("not learned", 0.0), ("learned", 0.5)):
        numbers = {"stop_reason": "max_updates", "token_accuracy": token, "baseline_accuracy": 0.25}
        rundir.write_json(path, {**summary, **numbers})
        rundir.RunDir(run).mark_done(0, "american lobster")
        index = report.render_report(run)
        on_page = "The token did not learn this class:" in " ".join(parse(page).texts)
        shown[case] = (on_page, " ".join(parse(index).texts).count("not learned"))
    assert shown == {"not learned": (True, 1), "learned": (False, 0)}


def test_sparse_metadata_still_renders(tiny_run, tmp_path):
    """A manifest or class.json missing optional keys (an older or partial run) renders with dashes."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    manifest = rundir.read_json(run / "manifest.json")
    rundir.write_json(run / "manifest.json", {"classes": manifest["classes"]})
    summary_path = run / "classes" / "0000-american-lobster" / "class.json"
    summary = rundir.read_json(summary_path)
    rundir.write_json(summary_path, {k: summary[k] for k in ("index", "name", "placeholder")})
    rundir.RunDir(run).mark_done(0, "american lobster")  # as an older run wrote it, not a damaged one
    index = report.render_report(run)
    assert "–" in " ".join(parse(index).texts)
    assert (index.parent / "classes" / "0000-american-lobster.html").is_file()


def test_self_contained_is_one_file_with_everything_embedded(rendered, tmp_path):
    path = report.render_report(rendered.parent.parent, tmp_path, self_contained=True)
    assert path == tmp_path / "run.html" and not (tmp_path / "index.html").exists()
    page = parse(path)
    ids = {a["id"] for _, a in page.tags if "id" in a}
    srcs = [a["src"] for tag, a in page.tags if tag == "img"]
    assert len(srcs) >= 2 * (8 + 2 + 2) and all(s.startswith("data:image/") for s in srcs)
    assert not any(tag == "link" or (tag == "script" and "src" in a) for tag, a in page.tags)
    anchors = [a["href"] for tag, a in page.tags if tag == "a" and a["href"].startswith("#")]
    assert anchors and all(h[1:] in ids for h in anchors)


def test_no_analysis_files_means_no_analysis_sections(tiny_run, tmp_path):
    """A run made without a tagger (or before analysis) has no optional files: their sections disappear."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    for path in [run / "enrichment.csv", run / "findings.json", *run.glob("classes/*/tags.csv")]:
        path.unlink(missing_ok=True)
    for path in run.glob("classes/*/attribution.json"):
        path.unlink()
    for c in rundir.read_json(run / "manifest.json")["classes"]:  # as a run without them marks its classes
        rundir.RunDir(run).mark_done(c["index"], c["name"])
    index = report.render_report(tmp_path / "run", tmp_path / "out")
    headings = parse(index.parent / "classes" / "0000-american-lobster.html").headings
    assert headings == [
        "Generated images: with the token vs the baseline prompt",
        "Training",
        "The learned token",
    ]
    assert "flagged attributes" not in " ".join(parse(index).texts)
    assert report.read_enrichment(tmp_path / "run") is None and report.read_findings(tmp_path / "run") is None


def test_rerender_reuses_unchanged_plots_and_redraws_changed_ones(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    folder = report.render_report(run).parent / "classes" / "0000-american-lobster"
    [first] = folder.glob("training-*.svg")
    stamp = first.stat().st_mtime_ns
    report.render_report(run)
    assert first.stat().st_mtime_ns == stamp  # same data: not drawn again
    history = run / "classes" / "0000-american-lobster" / "history.csv"
    rows = read_csv(history)
    rows[0]["loss"] = "9.0"
    write_csv(history, list(rows[0]), [list(r.values()) for r in rows])
    rundir.RunDir(run).mark_done(0, "american lobster")  # a class redone with another history
    report.render_report(run)
    [second] = folder.glob("training-*.svg")
    assert second != first and not first.exists()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no folder", "no run folder at"),
        ("no manifest", "is not a dct-audit run folder (no manifest.json)"),
        ("bad manifest", "manifest.json is not valid JSON"),
        ("bad enrichment", "enrichment.csv lacks the column(s) group, token_rate"),
        ("bad findings", "findings.json must be a list of objects with a class_index"),
    ],
)
def test_bad_run_folders_are_one_line_errors(tiny_run, tmp_path, breakage, message):
    run = tmp_path / "run"
    if breakage != "no folder":
        shutil.copytree(tiny_run, run)
    if breakage == "no manifest":
        (run / "manifest.json").unlink()
    elif breakage == "bad manifest":
        (run / "manifest.json").write_text("{ not json")
    elif breakage == "bad enrichment":
        (run / "enrichment.csv").write_text("class_index,attribute\n0,plate\n")
    elif breakage == "bad findings":
        (run / "findings.json").write_text('{"class_index": 0}')
    with pytest.raises(DctAuditError) as err:
        report.render_report(run)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_index_of_1000_classes_renders_quickly(tiny_run, tmp_path):
    run = synthetic_run(tiny_run, tmp_path / "big", [(i, f"class {i}") for i in range(1000)])
    start = time.perf_counter()
    data = report.read_run(run, run / "report")
    index = report.render_index(data, run / "report")
    seconds = time.perf_counter() - start
    page = parse(index)
    assert sum(tag == "tr" and a.get("class") == "status-done" for tag, a in page.tags) == 1000
    assert sum(tag == "a" and a["href"].startswith("classes/") for tag, a in page.tags) == 1000
    assert seconds < 20, f"index of 1000 classes took {seconds:.1f} s"


@pytest.mark.slow
def test_full_report_of_1000_classes(tiny_run, tmp_path):
    run = synthetic_run(tiny_run, tmp_path / "big", [(i, f"class {i}") for i in range(1000)])
    start = time.perf_counter()
    index = report.render_report(run)
    first = time.perf_counter() - start
    report.render_report(run)  # plots are reused
    print(f"1000 classes: first render {first:.1f} s, re-render {time.perf_counter() - start - first:.1f} s")
    assert len(list((index.parent / "classes").glob("*.html"))) == 1000


# Hostile text: markup and script fragments, quotes, template syntax, and any printable unicode.
FRAGMENTS = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    "</textarea></title></code>",
    "\"'><svg onload=alert(1)>",
    "{{ 7*7 }}",
    "{% if %}",
    "$x^2$",
    "-->",
    "<!--",
    "&amp;",
    "&",
    "javascript:alert(1)",
    " ",
    "lobster",
]
hostile = (
    st.lists(
        st.one_of(
            st.sampled_from(FRAGMENTS), st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=6)
        ),
        min_size=1,
        max_size=5,
    )
    .map("".join)
    .filter(lambda s: s.strip() != "" and s not in (*rundir.TAGS_KEYS, "plate", "class_index"))
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile)
def test_user_text_is_escaped_and_injects_nothing(tiny_run, tmp_path_factory, text):
    """Class names, labels, prompts and attribute names appear as text; the page structure is unchanged."""
    root = tmp_path_factory.mktemp("hostile")
    benign = report.render_report(hostile_run(tiny_run, root / "benign", "benign name"))
    nasty = report.render_report(hostile_run(tiny_run, root / "nasty", text))
    for rel in ("index.html", next(p for p in nasty.parent.glob("classes/*.html")).relative_to(nasty.parent)):
        good = parse(next(benign.parent.glob("classes/*.html")) if rel != "index.html" else benign)
        bad = parse(nasty.parent / rel)
        assert [t for t, _ in bad.tags] == [t for t, _ in good.tags]  # no element added or removed
        assert not any(k.startswith("on") for _, a in bad.tags for k in a)
        assert any(text in chunk for chunk in bad.texts)  # shown, as text


def test_the_index_opens_with_confirmed_findings_and_lists_unconfirmed_flags_apart(tiny_run, tmp_path):
    run = with_unfinished(tiny_run, tmp_path / "run")
    add_analysis(run)
    findings = rundir.read_json(run / "findings.json")
    findings[0].update(confirmed=True, class_name="american lobster", source="token")
    findings.append(
        {
            **findings[0],
            "attribute": "snow",
            "source": "sweep",
            "flagged": False,
            "effect": 0.0,
            "token_rate": 0.2,
            "baseline_rate": 0.2,
            "counterfactual": {**findings[0]["counterfactual"], "worst_replacement": "grass"},
        }
    )
    rundir.write_json(run / "findings.json", findings)
    index = parse(report.render_report(run))
    assert index.headings[0] == "Confirmed findings"
    text = " ".join(index.texts)
    assert "the token and the check" in text and "the check only (the token did not bring it in)" in text
    assert "Not confirmed" in text  # the second class's finding has no confirmation
    page = " ".join(parse(run / "report" / "classes" / "0000-american-lobster.html").texts)
    assert "though the token did not bring it in" in page


def test_a_finding_the_check_left_open_is_listed_apart_as_open_not_as_confirmed_or_ruled_out(
    tiny_run, tmp_path
):
    run = with_unfinished(tiny_run, tmp_path / "run")
    add_analysis(run)
    findings = rundir.read_json(run / "findings.json")
    cf = {**findings[0]["counterfactual"], "depends": True, "diff": 0.17, "ci_low": 0.06, "ci_high": 0.28}
    findings[0].update(class_name="american lobster", source="sweep", flagged=False, confirmed=False)
    findings[0].update(open=True, attribute="snow", counterfactual={**cf, "n": 32})
    rundir.write_json(run / "findings.json", findings[:1])
    index = parse(report.render_report(run))
    text = " ".join(index.texts)
    assert "Open: the check could not decide" in text
    assert "No finding was confirmed" in text and "0.06" in text and "0.28" in text
    assert "Not confirmed" not in text
    page = " ".join(parse(run / "report" / "classes" / "0000-american-lobster.html").texts)
    assert "open: the classifier may depend on it; the check could not decide" in page
    assert "can neither confirm nor rule out" in page


def test_a_dependence_of_this_classs_images_only_is_not_confirmed_and_shows_the_other_classes_numbers(
    tiny_run, tmp_path
):
    run = with_unfinished(tiny_run, tmp_path / "run")
    add_analysis(run)
    findings = rundir.read_json(run / "findings.json")
    association = {
        "subjects": ["tench", "goldfish"],
        "n": 16,
        "with_prob": 0.04,
        "diff": -0.013,
        "ci_low": -0.061,
        "ci_high": 0.035,
        "worst_replacement": "grass",
        "associated": False,
        "replacements": [{"name": "grass", "prob": 0.05, "diff": -0.013, "ci_low": -0.061, "ci_high": 0.035}],
    }
    cf = {**findings[0]["counterfactual"], "depends": True, "diff": 0.25, "ci_low": 0.14, "ci_high": 0.36}
    findings[0].update(
        class_name="american lobster", source="sweep", flagged=False, confirmed=False, open=False
    )
    findings[0].update(attribute="snow", counterfactual={**cf, "association": association})
    rundir.write_json(run / "findings.json", findings[:1])
    index = parse(report.render_report(run))
    text = " ".join(index.texts)
    assert "No finding was confirmed" in text and "Not confirmed" in text
    assert "this class's images only" in text and "-0.013" in text
    page = " ".join(parse(run / "report" / "classes" / "0000-american-lobster.html").texts)
    assert "not confirmed: a dependence of this class's images only" in page
    assert "tench, goldfish" in page and "-0.061" in page and "no association" in page
