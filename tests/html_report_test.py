"""cai_jax.html_report: schema, self-contained HTML, atomic writes, and a real headless
Chromium render (images decoded, tables counted, screenshot taken)."""

import base64
import html.parser
import json
import os
import shutil

import numpy as np
import pytest

from cai_jax import html_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(path, color, kind):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4, 3), dpi=80)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(10)
  if kind == "line":
    ax.plot(x, x ** 2, color=color)
  else:
    ax.bar(x, x + 1, color=color)
  fig.savefig(path, format="png")
  with open(path, "rb") as f:
    return f.read()


def _report():
  return {
      "title": "RL-CAI <report> & friends",
      "subtitle": "tiny run",
      "summary": [["snapshots", 3], ["best Elo", 123.456], ["note", "ok"], ["missing", None]],
      "sections": [
          {"id": "training", "title": "Training",
           "text": "First paragraph with <script>alert(1)</script> in it.\n\nSecond one.",
           "tables": [{"caption": "Elo", "columns": ["snapshot", "elo", "n"],
                       "rows": [["step-1", 0.0, 10], ["step-2", 1234.5, 20],
                                ["step-3", 0.012345, 30]]}],
           "plots": [{"caption": "PM score vs sqrt KL", "file": "pm_kl.png"}]},
          {"id": "monitors", "title": "Over-training monitors", "text": "Rates per snapshot.",
           "plots": [{"caption": "Boilerplate & evasiveness", "file": "plots/rates.png"}]},
      ],
      "numbers": {"elo": {"step-1": 0.0, "step-2": 1234.5}, "n": [10, 20, 30]},
  }


@pytest.fixture
def report_dir(tmp_path):
  os.makedirs(tmp_path / "plots")
  pngs = [_png(str(tmp_path / "pm_kl.png"), "tab:blue", "line"),
          _png(str(tmp_path / "plots" / "rates.png"), "tab:orange", "bar")]
  return tmp_path, pngs


class _Collector(html.parser.HTMLParser):
  """Collects tags with attributes, and the text inside <p> elements."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.paragraphs, self._in_p = [], [], False

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    if tag == "p":
      self._in_p = True
      self.paragraphs.append("")

  def handle_endtag(self, tag):
    if tag == "p":
      self._in_p = False

  def handle_data(self, data):
    if self._in_p:
      self.paragraphs[-1] += data


@pytest.mark.parametrize("value, text", [
    (0.625, "0.625"), (0.12345, "0.123"), (12.345, "12.3"), (999.7, "1000"),
    (1234.5, "1230"), (-0.000012345, "-1.23e-05"), (1.0, "1"), (np.float32(0.5), "0.5"),
    (135296, "135296"), (np.int64(7), "7"), (True, "yes"), (None, "-"), ("1.23456", "1.23456"),
    (float("nan"), "nan"), (float("-inf"), "-inf"),
])
def test_format_value(value, text):
  assert html_report.format_value(value) == text


def test_write_report_self_contained(report_dir):
  out, pngs = report_dir
  report = _report()
  html_path, json_path = html_report.write_report(report, str(out))
  assert html_path == str(out / "report.html") and json_path == str(out / "report.json")
  text = open(html_path, encoding="utf-8").read()
  parser = _Collector()
  parser.feed(text)
  parser.close()
  tags = parser.tags

  imgs = [a for t, a in tags if t == "img"]
  assert len(imgs) == 2
  assert [a["alt"] for a in imgs] == ["PM score vs sqrt KL", "Boilerplate & evasiveness"]
  prefix = "data:image/png;base64,"
  for attrs, png in zip(imgs, pngs):
    assert attrs["src"].startswith(prefix)
    assert base64.b64decode(attrs["src"][len(prefix):], validate=True) == png

  for _, attrs in tags:
    for key in ("src", "href"):
      if key in attrs:
        assert "http" not in attrs[key].lower() and not attrs[key].startswith("//")
  assert not any(t in ("script", "link", "iframe") for t, _ in tags)
  assert ("meta", {"name": "generator", "content": "cai_jax"}) in tags
  ids = [a.get("id") for t, a in tags if t == "section"]
  assert ids == ["summary", "training", "monitors", "numbers"]
  assert sum(t == "table" for t, _ in tags) == 1 and sum(t == "th" for t, _ in tags) == 3
  assert [a.get("href") for t, a in tags if t == "a"] == ["#training", "#monitors"]

  # Text is escaped, paragraphs split on blank lines, numbers formatted.
  assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
  assert "<title>RL-CAI &lt;report&gt; &amp; friends</title>" in text
  assert ("First paragraph with <script>alert(1)</script> in it." in parser.paragraphs
          and "Second one." in parser.paragraphs)
  assert '<td class="num">1230</td>' in text and '<td class="num">0.0123</td>' in text
  assert "<dd>123</dd>" in text and "<dd>-</dd>" in text

  with open(json_path, encoding="utf-8") as f:
    assert json.load(f) == report
  raw = open(json_path, encoding="utf-8").read()
  assert raw == json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
  assert sorted(os.listdir(out)) == ["plots", "pm_kl.png", "report.html", "report.json"]


def test_missing_plot_leaves_no_report(report_dir):
  out, _ = report_dir
  report = _report()
  report["sections"][1]["plots"][0]["file"] = "plots/absent.png"
  with pytest.raises(ValueError, match=r"absent\.png \(sections\[1\]\.plots\[0\]\.file\)"):
    html_report.write_report(report, str(out))
  assert sorted(os.listdir(out)) == ["plots", "pm_kl.png"]
  # A previous good report is left untouched by a failing rewrite.
  html_report.write_report(_report(), str(out), name="r")
  before = open(out / "r.html", encoding="utf-8").read()
  with pytest.raises(ValueError, match="absent.png"):
    html_report.write_report(report, str(out), name="r")
  assert open(out / "r.html", encoding="utf-8").read() == before
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("title"), r"report\.title is missing"),
    (lambda r: r.update(sectons=[]), r"unknown keys \['sectons'\]"),
    (lambda r: r["sections"][0]["tables"][0]["rows"].append([1, 2]),
     r"sections\[0\]\.tables\[0\]\.rows\[3\] has 2 cells; columns has 3"),
    (lambda r: r["sections"][1].update(id="training"), r"sections\[1\]\.id 'training' repeats"),
    (lambda r: r["sections"][1].update(id="has space"), r"sections\[1\]\.id"),
    (lambda r: r["summary"].append(["x", {"a": 1}]), r"summary\[4\]\[1\]"),
    (lambda r: r["sections"][0]["plots"][0].update(file="/abs/pm.png"), r"must be relative"),
])
def test_schema_errors_name_the_field(report_dir, mutate, match):
  out, _ = report_dir
  report = _report()
  mutate(report)
  with pytest.raises(ValueError, match=match):
    html_report.write_report(report, str(out))
  assert not (out / "report.html").exists() and not (out / "report.json").exists()


def test_plot_that_is_not_png(report_dir):
  out, _ = report_dir
  (out / "fake.png").write_text("not an image")
  report = _report()
  report["sections"][0]["plots"][0]["file"] = "fake.png"
  with pytest.raises(ValueError, match=r"fake\.png .* is not a PNG"):
    html_report.write_report(report, str(out))


def test_numpy_and_non_finite_numbers_in_json(report_dir):
  out, _ = report_dir
  report = _report()
  report["numbers"] = {"arr": np.array([1.5, 2.5]), "i": np.int32(3), "bad": float("nan")}
  _, json_path = html_report.write_report(report, str(out))
  with open(json_path, encoding="utf-8") as f:
    assert json.load(f)["numbers"] == {"arr": [1.5, 2.5], "i": 3, "bad": "nan"}


# ---------------------------------------------------------------------------- Chromium


def _chromium_or_skip():
  if shutil.which("chromium") or shutil.which("chromium-browser"):
    return
  if os.environ.get("CI") == "true":
    pytest.fail("headless Chromium is required in CI: apt-get install chromium")
  pytest.skip("chromium is not installed (apt-get install chromium)")


def test_renders_in_headless_chromium(report_dir):
  _chromium_or_skip()
  import matplotlib.image as mpimg
  out, _ = report_dir
  html_path, _ = html_report.write_report(_report(), str(out))
  shot = out / "shots" / "report.png"
  seen = html_report.check_in_chromium(html_path, screenshot_path=str(shot), timeout=30)
  assert seen == {"images": 2, "images_loaded": 2, "tables": 1,
                  "title": "RL-CAI <report> & friends"}
  with open(shot, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  img = mpimg.imread(str(shot))
  assert img.shape[:2] == (2000, 1200)
  assert float(np.var(img[..., :3])) > 1e-3


def test_chromium_sees_an_image_that_does_not_load(tmp_path):
  _chromium_or_skip()
  page = tmp_path / "page.html"
  page.write_text('<!DOCTYPE html><html><head><title>t</title></head><body>'
                  '<img src="nowhere.png" alt="x"><img src="https://example.invalid/a.png" '
                  'alt="y"></body></html>')
  seen = html_report.check_in_chromium(str(page), timeout=30)
  assert seen == {"images": 2, "images_loaded": 0, "tables": 0, "title": "t"}


def test_chromium_checks_a_page_whose_text_changes_length_in_lower_case(tmp_path):
  """'İ'.lower() is two characters: the probe still goes just before </body>."""
  _chromium_or_skip()
  page = tmp_path / "page.html"
  page.write_text("<!DOCTYPE html><html><head><title>t</title></head><body><p>İİİ</p>"
                  "</body></html>", encoding="utf-8")
  seen = html_report.check_in_chromium(str(page), timeout=30)
  assert seen == {"images": 0, "images_loaded": 0, "tables": 0, "title": "t"}


def test_chromium_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="absent.html"):
    html_report.check_in_chromium(str(tmp_path / "absent.html"))
  page = tmp_path / "p.html"
  page.write_text("<html><body></body></html>")
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
    html_report.check_in_chromium(str(page))
  fake = tmp_path / "bin"
  fake.mkdir()
  exe = fake / "chromium"
  exe.write_text("#!/bin/sh\necho 'first line' >&2\necho 'browser crashed: bad flag' >&2\n"
                 "exit 3\n")
  exe.chmod(0o755)
  monkeypatch.setenv("PATH", str(fake))
  with pytest.raises(RuntimeError, match="status 3 .*browser crashed: bad flag$"):
    html_report.check_in_chromium(str(page))
