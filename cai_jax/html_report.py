"""Self-contained HTML reports, and a check that headless Chromium renders them.

A report is a plain dict; this schema is the interface between the evaluate stage
(which fills it) and this module (which renders it):

  {"title": str,                                  # required, non-empty
   "subtitle": str,                               # optional
   "summary": [[label, value], ...],              # key facts shown first; value a
                                                  # str, number or None (shown as "-")
   "sections": [{"id": str,                       # unique, [A-Za-z][A-Za-z0-9_-]*; not
                                                  # "summary", "contents" or "numbers"
                 "title": str,
                 "text": str,                     # plain text; a blank line starts a
                                                  # new paragraph (optional)
                 "tables": [{"caption": str, "columns": [str, ...],
                             "rows": [[cell, ...], ...]}],   # cells as summary values,
                                                             # len(row) == len(columns)
                 "plots": [{"caption": str, "file": "name.png"}]}],  # a PNG, relative
                                                                     # to out_dir
   "numbers": {...}}                              # every number behind the report, any
                                                  # JSON nesting (optional)

Only "title" is required at the top level; "summary", "sections" and "numbers"
default to empty, and so do a section's "text", "tables" and "plots". Unknown keys
are errors (they are usually typos), named by their path, e.g.
``sections[1].tables[0].rows[2]``.

``write_report`` writes ``<name>.json`` (the dict, numpy values as Python numbers,
non-finite floats as the strings "nan" / "inf" / "-inf") and ``<name>.html``: one
file with inline CSS, each plot embedded as a base64 ``data:image/png`` URI (its
``alt`` is the caption), no JavaScript and no external URL. Numbers are shown with 3
significant digits (floats from 1000 up as rounded integers, integers in full);
every text is HTML-escaped. ``check_in_chromium`` opens a page in Debian's headless
Chromium and reports what the browser saw: image, loaded-image and table counts and
the title, optionally with a screenshot.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import re
import shutil
import signal
import subprocess
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESERVED_IDS = ("summary", "contents", "numbers")
CHECK_ID = "cai-check"

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_TOP_KEYS = {"title", "subtitle", "summary", "sections", "numbers"}
_SECTION_KEYS = {"id", "title", "text", "tables", "plots"}
_TABLE_KEYS = {"caption", "columns", "rows"}
_PLOT_KEYS = {"caption", "file"}

_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #1d1d1f; background: #fff; margin: 0 auto; max-width: 1100px;
       padding: 1.5em 2em 3em; line-height: 1.45; }
h1 { font-size: 1.8em; margin: 0.2em 0; }
h2 { font-size: 1.35em; border-bottom: 1px solid #d0d4da; padding-bottom: 0.2em;
     margin-top: 1.8em; }
.subtitle { color: #555; margin-top: 0; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.25em 1.5em;
             background: #f4f6f9; border: 1px solid #d0d4da; border-radius: 6px;
             padding: 0.8em 1.2em; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; font-variant-numeric: tabular-nums; }
nav ol { margin: 0.3em 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #d0d4da; padding: 0.3em 0.7em; }
thead th { background: #e8ecf2; text-align: left; }
tbody tr:nth-child(even) { background: #f7f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; }
figcaption { color: #444; font-size: 0.92em; margin-top: 0.3em; }
details pre { background: #f4f6f9; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
footer { margin-top: 3em; color: #777; font-size: 0.85em; }
"""


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
  """A summary value or table cell as display text.

  Strings are returned unchanged; None is "-"; booleans are "yes" / "no"; integers
  are shown in full; floats with 3 significant digits ("0.625", "12.3", "1e-05"),
  those that round to 1000 or more as integers ("1230"), non-finite ones as "nan",
  "inf", "-inf".

  Raises:
    ValueError: any other type.
  """
  if isinstance(value, str):
    return value
  if value is None:
    return "-"
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, numbers.Integral):
    return str(int(value))
  if isinstance(value, numbers.Real):
    v = float(value)
    if not math.isfinite(v):
      return str(v)
    rounded = float(f"{v:.3g}")
    if 1000.0 <= abs(rounded) < 1e15:
      return f"{rounded:.0f}"
    return f"{v:.3g}"
  raise ValueError(f"cannot show a {type(value).__name__} ({value!r}) in a report")


def _jsonable(obj: Any, where: str) -> Any:
  """A JSON-ready copy: numpy to Python, tuples to lists, non-finite floats to str."""
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if isinstance(k, (bool, np.bool_)) or not isinstance(k, (str, numbers.Integral)):
        raise ValueError(f"report field {where} has a key {k!r} that is not a string")
      out[str(k)] = _jsonable(v, f"{where}.{k}")
    return out
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist(), where)
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if obj is None or isinstance(obj, str):
    return obj
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, numbers.Integral):
    return int(obj)
  if isinstance(obj, numbers.Real):
    v = float(obj)
    return v if math.isfinite(v) else str(v)
  raise ValueError(f"report field {where} holds a {type(obj).__name__}, which JSON "
                   "cannot store")


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _need(cond: bool, where: str, msg: str):
  if not cond:
    raise ValueError(f"report field {where} {msg}")


def _check_keys(d: Any, allowed: set, where: str):
  _need(isinstance(d, Mapping), where, f"must be an object; got {type(d).__name__}")
  unknown = sorted(set(d) - allowed)
  _need(not unknown, where, f"has unknown keys {unknown}; allowed: {sorted(allowed)}")


def _check_str(d: Mapping, key: str, where: str, required: bool = True,
               nonempty: bool = False):
  if key not in d:
    _need(not required, f"{where}.{key}", "is missing")
    return
  _need(isinstance(d[key], str), f"{where}.{key}", f"must be a string; got {d[key]!r}")
  if nonempty:
    _need(bool(d[key].strip()), f"{where}.{key}", "is empty")


def _check_list(d: Mapping, key: str, where: str) -> list:
  v = d.get(key, [])
  _need(isinstance(v, (list, tuple)), f"{where}.{key}", f"must be a list; got "
        f"{type(v).__name__}")
  return list(v)


def _check_cell(v: Any, where: str):
  try:
    format_value(v)
  except ValueError:
    raise ValueError(f"report field {where} must be a string, number or null; got "
                     f"{v!r}") from None


def validate_report(report: Mapping[str, Any]) -> None:
  """Checks ``report`` against the module's schema.

  Raises:
    ValueError: the first problem, naming the field (e.g.
      ``sections[0].tables[1].rows[3]``).
  """
  _check_keys(report, _TOP_KEYS, "report")
  _check_str(report, "title", "report", nonempty=True)
  _check_str(report, "subtitle", "report", required=False)
  for i, item in enumerate(_check_list(report, "summary", "report")):
    w = f"summary[{i}]"
    _need(isinstance(item, (list, tuple)) and len(item) == 2, w,
          f"must be [label, value]; got {item!r}")
    _need(isinstance(item[0], str), f"{w}[0]", f"(the label) must be a string; got {item[0]!r}")
    _check_cell(item[1], f"{w}[1]")
  seen = set(RESERVED_IDS)
  for s, sec in enumerate(_check_list(report, "sections", "report")):
    w = f"sections[{s}]"
    _check_keys(sec, _SECTION_KEYS, w)
    _check_str(sec, "id", w)
    _need(bool(_ID.match(sec["id"])), f"{w}.id",
          f"{sec['id']!r} must match [A-Za-z][A-Za-z0-9_-]*")
    _need(sec["id"] not in seen, f"{w}.id",
          f"{sec['id']!r} repeats an earlier id or is reserved ({', '.join(RESERVED_IDS)})")
    seen.add(sec["id"])
    _check_str(sec, "title", w, nonempty=True)
    _check_str(sec, "text", w, required=False)
    for t, table in enumerate(_check_list(sec, "tables", w)):
      wt = f"{w}.tables[{t}]"
      _check_keys(table, _TABLE_KEYS, wt)
      _check_str(table, "caption", wt, required=False)
      columns = _check_list(table, "columns", wt)
      _need(bool(columns), f"{wt}.columns", "is empty")
      for c, col in enumerate(columns):
        _need(isinstance(col, str), f"{wt}.columns[{c}]", f"must be a string; got {col!r}")
      for r, row in enumerate(_check_list(table, "rows", wt)):
        wr = f"{wt}.rows[{r}]"
        _need(isinstance(row, (list, tuple)), wr, f"must be a list; got {row!r}")
        _need(len(row) == len(columns), wr,
              f"has {len(row)} cells; columns has {len(columns)}")
        for c, cell in enumerate(row):
          _check_cell(cell, f"{wr}[{c}]")
    for p, plot in enumerate(_check_list(sec, "plots", w)):
      wp = f"{w}.plots[{p}]"
      _check_keys(plot, _PLOT_KEYS, wp)
      _check_str(plot, "caption", wp, required=False)
      _check_str(plot, "file", wp, nonempty=True)
      _need(not os.path.isabs(plot["file"]), f"{wp}.file",
            f"{plot['file']!r} must be relative to the report folder")
  if "numbers" in report:
    _need(isinstance(report["numbers"], Mapping), "numbers", "must be an object")


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _esc(text: str) -> str:
  return html.escape(text, quote=True)


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _paragraphs(text: str) -> List[str]:
  return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _read_plot(out_dir: str, file: str, where: str) -> bytes:
  path = os.path.join(out_dir, file)
  if not os.path.isfile(path):
    raise ValueError(f"plot file {path} ({where}) does not exist")
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(PNG_SIGNATURE):
    raise ValueError(f"plot file {path} ({where}) is not a PNG")
  return data


def _table(table: Mapping[str, Any]) -> List[str]:
  out = ["<table>"]
  if table.get("caption"):
    out.append(f"<caption>{_esc(table['caption'])}</caption>")
  out.append("<thead><tr>" + "".join(f'<th scope="col">{_esc(c)}</th>'
                                     for c in table["columns"]) + "</tr></thead>")
  out.append("<tbody>")
  for row in table.get("rows", []):
    cells = []
    for v in row:
      cls = ' class="num"' if _is_number(v) else ""
      cells.append(f"<td{cls}>{_esc(format_value(v))}</td>")
    out.append("<tr>" + "".join(cells) + "</tr>")
  out.append("</tbody></table>")
  return out


def render_html(report: Mapping[str, Any], out_dir: str) -> str:
  """The report as one self-contained HTML page (plots read from ``out_dir``).

  Raises:
    ValueError: the report breaks the schema, or a plot file is missing or not a PNG
      (the message names the file and the field).
  """
  validate_report(report)
  images = {}
  for s, sec in enumerate(report.get("sections", [])):
    for p, plot in enumerate(sec.get("plots", [])):
      images[(s, p)] = _read_plot(out_dir, plot["file"], f"sections[{s}].plots[{p}].file")

  title = report["title"]
  out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         '<meta name="generator" content="cai_jax">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
         "<header>", f"<h1>{_esc(title)}</h1>"]
  if report.get("subtitle"):
    out.append(f'<p class="subtitle">{_esc(report["subtitle"])}</p>')
  out.append("</header>")
  summary = report.get("summary", [])
  if summary:
    out.append('<section id="summary"><h2>Summary</h2><dl class="summary">')
    for label, value in summary:
      out.append(f"<dt>{_esc(label)}</dt><dd>{_esc(format_value(value))}</dd>")
    out.append("</dl></section>")
  sections = report.get("sections", [])
  if len(sections) > 1:
    out.append('<nav id="contents"><h2>Contents</h2><ol>')
    out.extend(f'<li><a href="#{_esc(sec["id"])}">{_esc(sec["title"])}</a></li>'
               for sec in sections)
    out.append("</ol></nav>")
  for s, sec in enumerate(sections):
    out.append(f'<section id="{_esc(sec["id"])}">')
    out.append(f"<h2>{_esc(sec['title'])}</h2>")
    out.extend(f"<p>{_esc(p)}</p>" for p in _paragraphs(sec.get("text", "")))
    for table in sec.get("tables", []):
      out.extend(_table(table))
    for p, plot in enumerate(sec.get("plots", [])):
      caption = plot.get("caption", "") or plot["file"]
      uri = "data:image/png;base64," + base64.b64encode(images[(s, p)]).decode("ascii")
      out.append(f'<figure><img src="{uri}" alt="{_esc(caption)}">'
                 f"<figcaption>{_esc(caption)}</figcaption></figure>")
    out.append("</section>")
  if report.get("numbers"):
    dump = json.dumps(_jsonable(report["numbers"], "numbers"), indent=1, sort_keys=True,
                      ensure_ascii=False)
    out.append('<section id="numbers"><details><summary>All numbers (JSON)</summary>'
               f"<pre>{_esc(dump)}</pre></details></section>")
  out.append("<footer>Generated by cai_jax.</footer>")
  out.append("</body>")
  out.append("</html>")
  return "\n".join(out) + "\n"


def report_paths(out_dir: str, name: str = "report") -> Tuple[str, str]:
  """``(html_path, json_path)`` that ``write_report(report, out_dir, name)`` writes and
  returns (the paths a multi-process run's other processes report without writing)."""
  return os.path.join(out_dir, f"{name}.html"), os.path.join(out_dir, f"{name}.json")


def write_report(report: Mapping[str, Any], out_dir: str, name: str = "report"
                 ) -> Tuple[str, str]:
  """Writes ``out_dir/<name>.html`` and ``out_dir/<name>.json``.

  Both files are written to ``.tmp`` names and renamed only once both are complete,
  so a bad report (schema error, missing plot) leaves neither behind.

  Args:
    report: a dict following the module's schema.
    out_dir: the folder the plots' ``file`` paths are relative to; created if needed.
    name: file name stem.

  Returns:
    ``(html_path, json_path)``.

  Raises:
    ValueError: see ``render_html``; a value JSON cannot store (named by its path).
  """
  if not name or os.sep in name:
    raise ValueError(f"write_report: name {name!r} must be a plain file name stem")
  page = render_html(report, out_dir)
  data = json.dumps(_jsonable(report, "report"), indent=1, sort_keys=True,
                    ensure_ascii=False) + "\n"
  os.makedirs(out_dir, exist_ok=True)
  html_path, json_path = report_paths(out_dir, name)
  tmps = [html_path + ".tmp", json_path + ".tmp"]
  try:
    for tmp, text in zip(tmps, (page, data)):
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmps[1], json_path)
    os.replace(tmps[0], html_path)
  finally:
    for tmp in tmps:
      if os.path.exists(tmp):
        os.remove(tmp)
  return html_path, json_path


# --------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------

_CHECK_SCRIPT = """<script>
(function () {
  function report() {
    var imgs = document.images, loaded = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) { loaded++; }
    }
    var pre = document.createElement("pre");
    pre.id = "%s";
    pre.textContent = JSON.stringify({images: imgs.length, images_loaded: loaded,
        tables: document.getElementsByTagName("table").length, title: document.title});
    document.body.appendChild(pre);
  }
  if (document.readyState === "complete") { report(); }
  else { window.addEventListener("load", report); }
})();
</script>
""" % CHECK_ID

_BODY_END = re.compile(r"</body>", re.IGNORECASE)
_CHECK_RESULT = re.compile(r'<pre\b[^>]*\bid="%s"[^>]*>(.*?)</pre>' % CHECK_ID, re.DOTALL)


def find_chromium() -> str:
  """The path of ``chromium`` or ``chromium-browser`` on PATH.

  Raises:
    FileNotFoundError: neither is installed.
  """
  for exe in ("chromium", "chromium-browser"):
    path = shutil.which(exe)
    if path:
      return path
  raise FileNotFoundError("headless Chromium not found on PATH (chromium or "
                          "chromium-browser); apt-get install chromium")


def _last_line(text: str) -> str:
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else "(no output on stderr)"


def _run_chromium(exe: str, args: Sequence[str], page: str, timeout: float
                  ) -> Tuple[str, str]:
  """Runs Chromium on ``page`` with a fresh profile; returns (stdout, stderr)."""
  with tempfile.TemporaryDirectory(prefix="cai-chromium-",
                                   ignore_cleanup_errors=True) as profile:
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
           "--no-first-run", "--disable-extensions", "--disable-background-networking",
           "--host-resolver-rules=MAP * ~NOTFOUND", *args,
           "file://" + os.path.abspath(page)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      raise RuntimeError(f"chromium did not finish {page} within {timeout} s") from None
  stderr = err.decode("utf-8", "replace")
  if proc.returncode != 0:
    raise RuntimeError(f"chromium exited with status {proc.returncode} on {page}: "
                       f"{_last_line(stderr)}")
  return out.decode("utf-8", "replace"), stderr


def check_in_chromium(html_path: str, screenshot_path: Optional[str] = None,
                      timeout: float = 60) -> Dict[str, Any]:
  """Loads a page in headless Chromium and reports what the browser rendered.

  A copy of the page with a short script appended is opened in a temporary folder
  with ``--dump-dom`` (so an image that is not embedded in the page does not load,
  and network host names do not resolve); after the load event the script writes the
  counts into a ``<pre id="cai-check">`` element, which is read back from the dumped
  DOM. With ``screenshot_path``, a second run takes a 1200x2000 PNG screenshot of
  the unmodified page.

  Args:
    html_path: the HTML file.
    screenshot_path: where to write the screenshot PNG (parent folders created).
    timeout: seconds allowed for each Chromium run.

  Returns:
    ``{"images": <img> elements, "images_loaded": those complete with naturalWidth
    > 0, "tables": <table> elements, "title": document.title}``.

  Raises:
    FileNotFoundError: no such page, or Chromium is not installed.
    RuntimeError: Chromium failed, timed out or produced no result (the message
      ends with its last stderr line).
  """
  if not os.path.isfile(html_path):
    raise FileNotFoundError(f"page {html_path} does not exist")
  exe = find_chromium()
  with open(html_path, encoding="utf-8", errors="replace") as f:
    page = f.read()
  ends = [m.start() for m in _BODY_END.finditer(page)]
  cut = ends[-1] if ends else len(page)
  probe = page[:cut] + _CHECK_SCRIPT + page[cut:]
  with tempfile.TemporaryDirectory(prefix="cai-page-") as work:
    probe_path = os.path.join(work, "probe.html")
    with open(probe_path, "w", encoding="utf-8") as f:
      f.write(probe)
    dom, stderr = _run_chromium(exe, ["--dump-dom", "--virtual-time-budget=10000"],
                                probe_path, timeout)
    found = _CHECK_RESULT.findall(dom)
    if not found:
      raise RuntimeError(f"chromium's DOM of {html_path} has no #{CHECK_ID} result: "
                         f"{_last_line(stderr)}")
    result = json.loads(html.unescape(found[-1]))
    if screenshot_path is not None:
      shot = os.path.abspath(screenshot_path)
      os.makedirs(os.path.dirname(shot), exist_ok=True)
      if os.path.exists(shot):
        os.remove(shot)
      page_path = os.path.join(work, "page.html")
      shutil.copyfile(html_path, page_path)
      _, stderr = _run_chromium(exe, [f"--screenshot={shot}", "--window-size=1200,2000",
                                      "--hide-scrollbars"], page_path, timeout)
      if not os.path.isfile(shot) or os.path.getsize(shot) == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {shot}: {_last_line(stderr)}")
  return {"images": int(result["images"]), "images_loaded": int(result["images_loaded"]),
          "tables": int(result["tables"]), "title": str(result["title"])}
