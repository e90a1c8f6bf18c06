"""The quickstart's report, written from a made-up run (numbers, flat-colour grids and CSV logs; no
training): every number named in plain words with its meaning and chance level, the same in
report.md and report.html, and a page that stands alone. A headless Chromium loads the page at a
phone's width and a laptop's and checks that every picture loads and nothing sticks out sideways;
it is installed with apt on first use where the tests run as root, and skipped elsewhere unless
TESSERA_REQUIRE_CHROMIUM=1 (CI), where a skip is a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import select
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from datamodules.shapes_analysis import ATTRIBUTES
from tessera.commands.quickstart import DISPLAY_SCALE, SAMPLE_PROMPTS, StageLog, fidelity_rows, headline_rows, prompt_grid, write_report

WARNING = "The prior stopped on the time limit after 225 of 2,546 steps: results are below what the default reaches."


def grid_png(path: Path, columns: int, rows: int, image_size: int = 32) -> None:
    """A grid of the quickstart's size (2 px padding, DISPLAY_SCALE) in flat colours."""
    side = lambda count: (2 + count * (image_size + 2)) * DISPLAY_SCALE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side(columns), side(rows)), (40 * rows % 256, 120, 200)).save(path)


def caption_fidelity() -> dict:
    """`evaluate_shapes`'s report, made up: fidelity well above chance, an exact analyser."""
    def group(scale: float) -> dict:
        fidelity = dict(zip(ATTRIBUTES, (0.99, 0.97, 0.96, 0.95, 0.93, 0.945 * scale, 0.9 * scale)))
        return {
            "n": 48,
            "fidelity": fidelity,
            "analyser": {**{name: 1.0 for name in ATTRIBUTES}, "exact": 1.0},
            "chance": {name: share / 240 for name, share in fidelity.items()},
        }

    report = {"image_size": 32, "num_samples": 48, "seen": group(1.0), "held_out": group(0.9)}
    report["seen"]["fidelity_by_layout"] = {
        layout: {"n": 12, **report["seen"]["fidelity"]} for layout in ("single", "pair", "row", "column")
    }
    return report


def made_up_run(out: Path, warning: str | None = None) -> Path:
    """What `run_quickstart` leaves before its report, and the report; returns OUT."""
    grid_png(out / "reconstructions.png", 8, 2)
    grid_png(out / "samples.png", 4, len(SAMPLE_PROMPTS))
    for index in range(len(SAMPLE_PROMPTS)):
        grid_png(out / prompt_grid(index), 4, 1)
    runs = {}
    for stage, loss in (("tokenizer", "rec_loss"), ("prior", "image_loss")):
        runs[stage] = out / f"{stage}_run"
        (runs[stage] / "csv" / "version_0").mkdir(parents=True)
        rows = "".join(f"{step},{1 / step:.4f},\n" for step in range(49, 500, 50)) + "499,,0.01\n"
        (runs[stage] / "csv" / "version_0" / "metrics.csv").write_text(f"step,train/{loss},val/{loss}\n{rows}")
    log = StageLog()
    log.lines += [
        "[data] train: 16384 samples in 32 shards (1s)",
        f"[tokenize] train: 16384 samples into {out}/data/train_tokens/{{00000..00031}}.tar, a path too long for a phone (40s)",
    ]
    numbers = {
        "reconstruction_psnr_db": 31.42,
        "codebook_usage": 0.871,
        "caption_fidelity": caption_fidelity(),
        "sampling": "top-k 64, guidance scale 1.5",
        "minutes": 11.5,
        "steps": {"tokenizer": 1425, "prior": 225},
    }
    write_report(out, numbers, warning, runs["tokenizer"], runs["prior"], log)
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return made_up_run(tmp_path_factory.mktemp("quickstart"), WARNING)


def page_text(page: str) -> str:
    """What a reader of the page sees: its text without tags and the style sheet."""
    return html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", page, flags=re.S)))


def test_report_names_every_number_in_plain_words_with_its_meaning_and_chance(report):
    page, markdown = (report / "report.html").read_text(), (report / "report.md").read_text()
    numbers = {"caption_fidelity": caption_fidelity(), "reconstruction_psnr_db": 31.42, "codebook_usage": 0.871}
    _, rows = headline_rows(numbers)
    _, attributes = fidelity_rows(numbers["caption_fidelity"])
    for (name, meaning), *values in rows + attributes:
        assert f"{name} {meaning}" in " ".join(page_text(page).split()), name
        numbers_md = [value if isinstance(value, str) else f"{value[0]} (chance {value[1]})" for value in values]
        assert f"| {name} | {' | '.join(numbers_md)} | {meaning} |" in markdown, name
    assert rows[2][0][0] == "everything right, seen prompts" and rows[2][1:] == ["90.0%", "0.38%"]
    assert attributes[0][0][0] == "number of shapes" and attributes[0][1:] == [("99.0%", "0.41%"), ("99.0%", "0.41%"), "100.0%"]
    for key in ("seen_all", "color_and_shape", "chance_all", "held_out_all", "analyser_all", "reconstruction_psnr_db", "codebook_usage"):
        assert key not in page_text(page) and key not in markdown, f"raw metric key {key} in the report"


def test_report_warns_at_the_top_of_the_page_when_a_stage_stopped_short(report, tmp_path):
    page = (report / "report.html").read_text()
    body = page_text(page[page.index("<body>"):]).split()
    assert " ".join(body[:6]) == "Tessera quickstart report Stopped short. The", "the warning comes right under the title"
    assert WARNING in " ".join(body)
    assert (report / "report.md").read_text().splitlines()[2] == f"**{WARNING}**"
    full_run = made_up_run(tmp_path)
    assert "Stopped short" not in (full_run / "report.html").read_text() and "**" not in (full_run / "report.md").read_text()


def test_report_page_stands_alone_with_each_prompt_under_its_samples(report):
    page = (report / "report.html").read_text()
    assert "<script" not in page and not re.search(r"(?:src|href)=\"?(?:https?:)?//", page), "no script, nothing fetched"
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert sources and all((report / source).is_file() for source in sources)
    for index, prompt in enumerate(SAMPLE_PROMPTS):
        figure = re.search(rf'<img[^>]* src="{prompt_grid(index)}"[^>]*><figcaption>([^<]*)</figcaption>', page)
        assert figure and prompt in html.unescape(figure[1]), prompt
    assert "held out" in page_text(page)


# -----------------------------------------------------------------------------
# the page in a browser


def chromium_or_reason() -> tuple[str | None, str]:
    """The chromium executable, installed with apt where it is missing and this is root; else why not."""
    if path := shutil.which("chromium"):
        return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed, and installing it needs root and apt-get"
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:  # a stale package list: refresh it once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"apt-get install chromium failed:\n{result.stderr[-3000:]}"
    return shutil.which("chromium"), ""


@pytest.fixture(scope="session")
def chromium() -> str:
    path, reason = chromium_or_reason()
    if path is None:
        if os.environ.get("TESSERA_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"TESSERA_REQUIRE_CHROMIUM=1, but {reason}")
        pytest.skip(reason)
    return path


# what the test reads of the loaded page (the report itself has no script)
MEASURE = """(() => {
  const root = document.documentElement, width = root.clientWidth;
  return {
    width,
    scrollWidth: root.scrollWidth,
    images: document.images.length,
    broken: [...document.images].filter(image => !image.complete || image.naturalWidth === 0).map(image => image.src),
    sticking_out: [...document.body.querySelectorAll("*")].filter(e => e.getBoundingClientRect().right > width + 0.5)
      .map(e => `${e.tagName} ${e.textContent.slice(0, 60)}`),
  };
})()"""


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): it
    reads JSON commands from its fd 3 and writes replies and events to its fd 4, each ended by NUL.
    A window cannot be narrower than 500 px, so a phone's width is emulated instead."""

    def __init__(self, chromium: str, profile: Path):
        commands, self.commands = os.pipe()
        self.replies, replies = os.pipe()
        shell = f'exec "$@" 3<&{commands} 4>&{replies} {commands}<&- {replies}>&-'
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        self.log = (profile.parent / "chromium.log").open("w")
        self.process = subprocess.Popen(["bash", "-c", shell, "bash", chromium, *flags], pass_fds=(commands, replies),
                                        stdout=self.log, stderr=subprocess.STDOUT)
        os.close(commands), os.close(replies)
        self.buffer, self.events, self.last_id = b"", [], 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while "id" not in (reply := self.receive()) or reply["id"] != self.last_id:
            self.events.append(reply)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def wait_for(self, event: str, session: str) -> dict:
        while not (found := [e for e in self.events if e.get("method") == event and e.get("sessionId") == session]):
            self.events.append(self.receive())
        self.events.remove(found[0])
        return found[0]

    def receive(self, timeout: float = 30) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], timeout)
            chunk = os.read(self.replies, 1 << 16) if ready else b""
            assert chunk, f"chromium went silent or exited (status {self.process.poll()}); see {self.log.name}"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def measure(self, page: Path, width: int, height: int = 844) -> dict:
        """MEASURE of `page` loaded in a new tab `width` CSS px wide (a phone's, mobile, under 600)."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1, mobile=width < 600)
        self.send("Page.enable", session)
        self.send("Page.navigate", session, url=page.as_uri())
        self.wait_for("Page.loadEventFired", session)  # every picture loaded or failed
        return self.send("Runtime.evaluate", session, expression=MEASURE, returnByValue=True)["result"]["value"]

    def close(self) -> None:
        if self.process.poll() is None:
            os.write(self.commands, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        os.close(self.commands), os.close(self.replies), self.log.close()


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium") / "profile")
    yield browser
    browser.close()


@pytest.mark.chromium
@pytest.mark.parametrize("width", [390, 1280])
def test_report_page_loads_every_picture_and_fits_a_phone_and_a_laptop(report, browser, width):
    findings = browser.measure(report / "report.html", width)
    assert width - 20 < findings["width"] <= width, findings  # less a scroll bar at most
    assert findings["images"] == 2 + len(SAMPLE_PROMPTS) and not findings["broken"], findings
    assert findings["scrollWidth"] <= findings["width"] and not findings["sticking_out"], findings
