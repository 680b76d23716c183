"""The dashboards as a person sees them, in a real browser (headless Chromium, installed by `make test`): a
finished 3-step GRPO run's TensorBoard, through its HTTP API and on its page, and the run's report.html.

The screenshots stay in the tests' temporary directory (pytest prints where with -s: `tensorboard.png`,
`report.png`)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rl.trainer import GRPOTrainer
from tests.helpers import run_config

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    message = "no chromium and chromedriver here: `make browser` installs them (`make test` does)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.keys import Keys  # noqa: E402
STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 3-step run with TensorBoard, samples at every step and the end-of-run report."""
    tmp = tmp_path_factory.mktemp("dashboards")
    cfg = run_config(tmp, train={"max_steps": STEPS},
                     tracking={"tensorboard": True, "report": True, "log_completions_every": 1})
    GRPOTrainer(cfg).train()
    return tmp / "run"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    # no sandbox (tests may run as root); no background networking: the machine may have no network at all
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if result := predicate():
                return result
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {seconds} s")


def not_blank(png: Path) -> None:
    """A rendered page, not an empty one: many colours, and ink on a good part of it."""
    from PIL import Image

    image = Image.open(png).convert("RGB").resize((350, 250))
    colours = image.getcolors(maxcolors=1 << 16) or []
    background = max(colours)[1]
    ink = sum(n for n, c in colours if sum(abs(a - b) for a, b in zip(c, background)) > 60) / (350 * 250)
    assert len(colours) > 30 and ink > 0.01, f"{png} looks blank: {len(colours)} colours, {ink:.1%} ink"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run / "tensorboard"),
                                "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is None and get_json(f"{url}/data/environment"), 90, "TensorBoard answering")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_tensorboard_serves_the_runs_scalars_texts_and_histograms(run, tensorboard):
    rows = metrics(run)
    tags = wait_for(lambda: get_json(f"{tensorboard}/data/plugin/scalars/tags")["."], 60, "scalar tags")
    for tag in ("reward/mean", "reward/std", "rewards/token_reward/mean", "train/loss", "train/entropy",
                "train/learning_rate", "timing/rollout", "timing/train", "rollout/completions/mean_length",
                "rollout/tokens_per_s", "memory/peak_rss_gb"):
        assert tag in tags, (tag, sorted(tags))
    series = get_json(f"{tensorboard}/data/plugin/scalars/scalars?run=.&tag=reward/mean")
    assert [s[1] for s in series] == [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [s[2] for s in series] == pytest.approx([r["reward"] for r in rows], rel=1e-6)

    texts = get_json(f"{tensorboard}/data/plugin/text/tags")["."]
    assert {"config/text_summary", "completions/text_summary"} <= set(texts)  # add_text's tags
    shown = get_json(f"{tensorboard}/data/plugin/text/text?run=.&tag=completions/text_summary")
    assert [t["step"] for t in shown] == list(range(1, STEPS + 1))
    last = samples(run)[-1]
    assert "reward/token_reward" in shown[-1]["text"] and "<table>" in shown[-1]["text"]
    assert f"{last['reward']:.4g}" in shown[-1]["text"]
    config = get_json(f"{tensorboard}/data/plugin/text/text?run=.&tag=config/text_summary")
    assert "token_reward" in config[0]["text"]
    histograms = get_json(f"{tensorboard}/data/plugin/histograms/tags")["."]
    assert "reward/histogram" in histograms


def test_tensorboard_page_shows_the_reward_curve(run, tensorboard, browser, tmp_path):
    browser.get(f"{tensorboard}/#timeseries")
    # the run's sections, as TensorBoard groups the tags (it renders the cards in view only)
    wait_for(lambda: "memory" in browser.find_element("tag name", "body").text, 90, "the tag groups on the page")
    box = browser.find_element("css selector", "input[placeholder^='Filter tags']")
    box.send_keys("^reward/")
    wait_for(lambda: "reward/mean" in browser.find_element("tag name", "body").text, 60,
             "reward/mean on TensorBoard's page")
    box.send_keys(Keys.ESCAPE)  # the filter's suggestions off the charts
    wait_for(lambda: browser.execute_script(
        "return [...document.querySelectorAll('line-chart, canvas, svg')].length") > 0, 60, "a chart drawn")
    time.sleep(2)  # the charts' first frame
    shot = tmp_path / "tensorboard.png"
    browser.save_screenshot(str(shot))
    print(f"TensorBoard screenshot: {shot}")
    not_blank(shot)


def test_the_report_renders_every_plot_and_the_runs_samples(run, browser, tmp_path):
    report = run / "report.html"
    assert report.is_file(), "the run did not write report.html at its end"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text, "the report must not fetch anything"
    browser.get(report.as_uri())
    images = browser.execute_script(
        "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    titles = [alt for alt, *_ in images]
    for title in ("reward (weighted sum)", "reward per function (mean)", "policy entropy",
                  "completion length (tokens)", "step time by phase (s)", "memory (GB)", "loss"):
        assert title in titles, (title, titles)
    for alt, complete, width, height in images:
        assert complete and width > 300 and height > 150, (alt, width, height)

    logged = samples(run)
    rows = browser.execute_script("return document.querySelectorAll('#samples tbody tr').length")
    assert rows == len(logged) > 0
    first = browser.execute_script("return document.querySelector('#samples tbody tr').textContent")
    assert logged[0]["completion"].strip()[:20] in first
    box = browser.find_element("id", "step")
    box.send_keys("2")
    visible = browser.execute_script(
        "return [...document.querySelectorAll('#samples tbody tr')].filter(r => r.style.display !== 'none')"
        ".map(r => +r.dataset.step)")
    assert visible == [s["step"] for s in logged if s["step"] == 2] and visible
    assert browser.find_element("id", "shown").text == str(len(visible))
    box.clear()
    browser.execute_script("document.getElementById('step').dispatchEvent(new Event('input'))")
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    print(f"report screenshot: {shot}")
    not_blank(shot)
