"""The report in a real browser: headless Chromium (Debian's) driven by Playwright.

A small sweep on the tiny model, with a hostile generation planted in one run's items, then
``quanteval-report``; the pages must load without console errors, every image must load, the verdict
matrix must have one cell per row x variant, and the planted markup must not execute.

Chromium comes from Debian's ``chromium`` package (``.ci/run`` installs it). Without it the test is
skipped with the reason, unless ``QUANTEVAL_REQUIRE_BROWSER=1`` (which ``.ci/run`` sets once chromium
is installed), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("QUANTEVAL_REQUIRE_BROWSER") == "1"
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        if REQUIRED:
            pytest.fail("playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright is not installed")
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")


@pytest.fixture(scope="module")
def planted_report(tiny_model, tiny_data, tmp_path_factory):
    _browser_or_skip()
    results = tmp_path_factory.mktemp("browser")
    proc = run_cli("model=hf", f"model.name_or_path={tiny_model}", f"data_dir={tiny_data}", f"results_dir={results}",
                   "preset=smoke", "preset.n_windows=2", "preset.seq_len=64", "method=none,rtn", "bits=8,2",
                   "task=wikitext2,gsm8k", "collapse_kl=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = results / "default" / "runs"
    items_file = next(runs.glob("gsm8k__hf__rtn-w8*.items.jsonl"))
    items = [json.loads(line) for line in items_file.read_text().splitlines()]
    items[0]["output"] = XSS  # a hostile generation, as a model could produce
    items_file.write_text("".join(json.dumps(it) + "\n" for it in items))
    out = results / "report"
    proc = run_cli(str(results / "default"), "--out", str(out), cli="quanteval-report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _visit(page, url: str) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return errors


def test_report_in_headless_chromium(planted_report, tmp_path):
    from playwright.sync_api import sync_playwright

    verdicts = json.loads((planted_report / "verdicts.json").read_text())["verdicts"]
    expected_cells = len({(v["row"], v["label"]) for v in verdicts if v["model"] == "hf"})
    rows = len({v["row"] for v in verdicts if v["model"] == "hf"})
    cols = len({v["label"] for v in verdicts if v["model"] == "hf"})
    assert expected_cells == rows * cols == 5 * 3  # wikitext2 x3 + gsm8k x2 rows; baseline, rtn w8, rtn w2
    item_page = next((planted_report / "items").glob("hf__gsm8k__rtn-w8*.html"))
    with sync_playwright() as p:
        # launch() gives Chromium a fresh temporary profile (its own --user-data-dir), deleted on close
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors = _visit(page, (planted_report / "index.html").as_uri())
            assert errors == []
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth])")
            assert images and all(w > 0 for _, w in images), images
            assert page.locator("table.matrix td.cell").count() == expected_cells
            assert page.evaluate("typeof window.__pwned") == "undefined"
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

            page = browser.new_page()
            errors = _visit(page, item_page.as_uri())
            assert errors == []
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert XSS in page.inner_text("body")  # shown as text, not markup
            total = page.locator("tr.item").count()
            page.check("#f-flipped")
            shown = int(page.inner_text("#shown"))
            assert shown == page.locator("tr.item:visible").count() <= total
            page.screenshot(path=str(tmp_path / "items.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path / 'report.png'}, {tmp_path / 'items.png'}")
