"""The HTML report: every executed notebook under an outputs folder rendered with nbconvert
into `<out>/report/`, and an index.html linking the summary, each study and each run; and the
README's verdict table, generated from the same verdicts.json files (`make readme`).

Pages open offline: figures are embedded, and the template (bnlib/report_template) loads no
script from the network. Code cells are hidden by default, with a button to show them.

A verdict is shown the same way everywhere a reader meets it first (index, summary table,
README): one compact row per claim, the outcome with its cause ("inconclusive (budget)"), so no
word stands alone without its reason, the effect with its 95% interval and n with what it
counts; the full sentence is one click away (issue 21, item 6).
"""
from __future__ import annotations

import concurrent.futures
import functools
import html
import json
import math
import multiprocessing
import os
import re
import textwrap
from dataclasses import fields
from pathlib import Path

import nbformat
import pandas as pd

from .errors import ConfigError
from .records import RunDir, atomic_write
from .stats import Verdict, verdict_table
from .studies import STUDIES

__all__ = ["build_report", "render_notebook", "load_verdicts", "claim_words", "effect_text", "at_budget_text",
           "compact_table", "readme_table", "readme_verdicts", "rewrite_block", "README_BEGIN", "README_END"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "report_template"


@functools.lru_cache(maxsize=1)
def _exporter():
    from nbconvert import HTMLExporter  # slow to import: only where a report is rendered

    # one exporter per process: building one (templates, filters) cost a third of a run page's time
    return HTMLExporter(extra_template_basedirs=[str(TEMPLATE_DIR.parent)], template_name=TEMPLATE_DIR.name)


def render_notebook(src: Path, dst: Path, index_href: str) -> None:
    nb = nbformat.read(str(src), as_version=4)
    body, _ = _exporter().from_notebook_node(nb, resources={"bnlib_index": index_href,
                                                            "metadata": {"name": src.stem}})
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, body.encode())


def _render_page(job: tuple) -> str | None:
    """render_notebook for one (src, dst, index_href), unless dst is newer than src (a report
    rendered again redoes only what changed); the error's text instead of raising."""
    src, dst, href = job
    try:
        if not (dst.exists() and dst.stat().st_mtime > src.stat().st_mtime):
            render_notebook(src, dst, href)
    except Exception as e:  # noqa: BLE001 — nbformat/nbconvert raise several kinds
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def render_pages(jobs: list[tuple]) -> list[str | None]:
    """_render_page over many notebooks (a study's hundreds of run pages) on every core, each
    worker process with its own exporter; in this process when there are few."""
    workers = min(len(jobs) // 20, os.cpu_count() or 1, 8)
    if workers < 2:
        return [_render_page(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # not fork: the caller may hold threads (Dask, kernels)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_render_page, jobs, chunksize=16))


def _has_error(nb_path: Path) -> bool:
    nb = nbformat.read(str(nb_path), as_version=4)
    return any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


# the forest plot uses the same three colours (bnlib.plots.OUTCOME_COLOURS)
OUTCOME_CSS = {"supported": "#1a7f37", "contradicted": "#b42318", "inconclusive": "#9a6700"}
_VERDICT_FIELDS = {f.name for f in fields(Verdict)}


def load_verdicts(path: Path) -> list[Verdict]:
    """One study's verdicts.json. Fields a newer bnlib wrote are ignored and fields an older one
    did not write take their defaults, so old outputs still show; anything else that is not a
    list of verdicts raises ValueError (OSError when the file cannot be read)."""
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list) or not all(isinstance(v, dict) for v in items):
        raise ValueError(f"{path}: not a list of verdicts")
    try:
        return [Verdict(**{k: x for k, x in v.items() if k in _VERDICT_FIELDS}) for v in items]
    except TypeError as e:  # a required field (study, claim, outcome, sentence) missing
        raise ValueError(f"{path}: {e}") from e


def claim_words(v: Verdict, width: int = 48) -> str:
    """The claim in a few words: Verdict.short, or the claim cut at a word boundary."""
    return v.short or textwrap.shorten(v.claim, width, placeholder="…")


def _effect(v: Verdict) -> dict:
    return v.effects[0] if v.effects and isinstance(v.effects[0], dict) else {}


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def effect_text(v: Verdict) -> str:
    """'−0.392 [−0.507, −0.278]' from the verdict's first effect; the estimate alone with why it
    has no interval; '' when the claim has no estimate."""
    e = _effect(v)
    mean, lo, hi = _num(e.get("mean")), _num(e.get("lo")), _num(e.get("hi"))
    if not math.isfinite(mean):
        return ""
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{_signed(mean)} [{_signed(lo)}, {_signed(hi)}]"
    return f"{_signed(mean)} (no interval: {e.get('why_no_interval') or 'n < 2'})"


def _n(v: Verdict) -> tuple[str, str]:
    """('5 seeds', the unit in full): n and what it counts, the unit cut before its
    parenthesis (the sentence keeps it whole)."""
    e = _effect(v)
    n, unit = e.get("n"), str(e.get("n_unit") or "")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n):
        return "", unit
    return f"{int(n)} {unit.split(' (')[0]}".strip(), unit


def at_budget_text(v: Verdict) -> str:
    """'contradicted at 64 of the paper's 63 360 steps': the outcome these runs give at their own
    budget (Verdict.at_budget), with the budget where the reason states it; '' when there is none
    or it is the outcome itself (nothing to add)."""
    if not v.at_budget or v.at_budget == v.outcome:
        return ""
    budget = next((r[len("budget: "):].split(" (under")[0] for r in v.reasons if r.startswith("budget: ")), "")
    return f"{v.at_budget} at {budget or 'this budget'}"


def compact_table(verdicts: list[Verdict]) -> pd.DataFrame:
    """stats.verdict_table made compact for a notebook: integer n with its unit in a few words,
    numbers to 3 decimals, the claim in a few words, the outcome with its cause; the reasons in
    full stay in each verdict's sentence."""
    t = verdict_table(verdicts).drop(columns="why")
    t["claim"] = [claim_words(v) for v in verdicts]
    t["n"] = t["n"].astype("Int64")
    t["unit"] = t["unit"].fillna("").astype(str).str.split(" (", regex=False).str[0]
    return t.round(3)


def _verdict_rows(verdicts: list[Verdict], study_cell: str) -> str:
    """The index's rows for one study: claim in a few words (the full sentence one click away),
    outcome with its cause, effect [95% CI], n and its unit."""
    rows = []
    for i, v in enumerate(verdicts):
        n, unit = _n(v)
        at = f'<br><small class="at-budget">{html.escape(at_budget_text(v))}</small>' if at_budget_text(v) else ""
        rows.append(f'<tr class="{html.escape(v.outcome)}">{study_cell if i == 0 else ""}'
                    f"<td><details><summary>{html.escape(claim_words(v))}</summary>"
                    f'<p class="sentence">{html.escape(v.sentence)}</p></details></td>'
                    f'<td class="outcome">{html.escape(v.label)}{at}</td><td>{html.escape(effect_text(v))}</td>'
                    f'<td title="{html.escape(unit)}">{html.escape(n)}</td></tr>')
    return "".join(rows)


def _study_rows(path: Path, study_cell: str) -> str:
    """The study's verdicts (written by its analysis notebook) as compact rows, or one row that
    says there are none yet or why they cannot be read."""
    why = "no verdicts in verdicts.json"
    try:
        verdicts = load_verdicts(path)
    except FileNotFoundError:
        verdicts, why = [], "no verdicts written yet"
    except (OSError, ValueError) as e:
        verdicts, why = [], f"verdicts.json unreadable: {type(e).__name__}: {str(e)[:200]}"
    if verdicts:
        return _verdict_rows(verdicts, study_cell.replace("<td>", f'<td rowspan="{len(verdicts)}">', 1))
    return f'<tr>{study_cell}<td colspan="4">{html.escape(why)}</td></tr>'


def _manifest(path: Path) -> dict:
    """A study's manifest.json, or {} when it is missing, unreadable or not an object (the
    study is still listed, by its folder name)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def build_report(out="outputs") -> Path:
    """Render summary, studies and runs; write report/index.html. Returns its path. An `out`
    that is not an outputs folder (missing, a file, nothing in it to report) raises ConfigError
    before report/ is made."""
    out = Path(os.fspath(out)).expanduser()
    if not out.is_dir():
        raise ConfigError(f"out={str(out)!r}: {'a file, not a folder' if out.exists() else 'does not exist'}; "
                          f"pass the outputs folder a study wrote (--out, default 'outputs')")
    if not any((out / n).exists() for n in ("runs", "studies", "summary.ipynb")):
        raise ConfigError(f"out={str(out)!r}: nothing to report (no runs/, studies/ or summary.ipynb in it); pass "
                          f"the outputs folder a study wrote, or run one first (python -m bnlib study p1)")
    rep = out / "report"
    sections = []

    unreadable = []

    def page(src: Path, rel: str) -> str | None:
        """Render one notebook; an unreadable one (e.g. cut short by a full disk) is listed
        on the index instead of stopping the report."""
        err = _render_page((src, rep / rel, "../" * (len(Path(rel).parts) - 1) + "index.html"))
        if err is not None:
            unreadable.append(f"<li><code>{html.escape(str(src))}</code>: {html.escape(err)}</li>")
            return None
        return rel

    if (out / "summary.ipynb").exists() and (rel := page(out / "summary.ipynb", "summary.html")):
        sections.append(f'<h2>Summary</h2><p><a href="{rel}">every verdict at a glance (a forest plot), then every '
                        f'run: accuracy, loss stability, γ/β drift</a>'
                        f'{" (has errors)" if _has_error(out / "summary.ipynb") else ""}</p>')
    else:
        sections.append("<h2>Summary</h2><p>not run yet, or unreadable (<code>make study</code>)</p>")

    study_rows = []
    for nb in sorted(p for p in (out / "studies").glob("*/*.ipynb") if not p.name.startswith(".")):
        name = nb.parent.name
        man = _manifest(nb.parent / "manifest.json")
        title, preset = str(man.get("title", name)), str(man.get("preset", ""))
        rel = page(nb, f"studies/{name}.html")
        if rel is None:
            continue
        cell = (f'<td><a href="{rel}">{html.escape(title)}</a> [{html.escape(preset)}]'
                f'{" (has errors)" if _has_error(nb) else ""}</td>')
        study_rows.append(_study_rows(nb.parent / "verdicts.json", cell))
    sections.append("<h2>Studies and their verdicts</h2><p>One row per claim; click a claim for its full sentence. "
                    "An outcome carries its cause: <i>inconclusive (budget)</i>, <i>(ladder edge)</i>, "
                    "<i>(interval crosses)</i> ….</p>"
                    '<table class="verdicts"><tr><th>study</th><th>claim</th><th>outcome</th>'
                    "<th>effect [95% CI]</th><th>n</th></tr>"
                    + ("".join(study_rows) or '<tr><td colspan="5">none run yet</td></tr>') + "</table>")

    run_rows = []
    run_nbs = sorted((out / "runs").glob("*/run.ipynb"))
    errors = render_pages([(nb, rep / "runs" / f"{nb.parent.name}.html", "../index.html") for nb in run_nbs])
    for nb, err in zip(run_nbs, errors):
        rd = RunDir(nb.parent)
        st = rd.status()
        if st is None:  # missing, unreadable or of the wrong shape: listed as damaged, with why
            st = {"status": "damaged", "error": rd.verify() or "status.json missing"}
        m = st.get("metrics") or {}
        if err is not None:  # unreadable (e.g. cut short by a full disk): listed, the report goes on
            unreadable.append(f"<li><code>{html.escape(str(nb))}</code>: {html.escape(err)}</li>")
            continue
        rel = f"runs/{rd.id}.html"
        nums = [m.get(k) for k in ("best_val_acc", "test_acc_at_best_val")]
        acc = " / ".join(f"{v:.3f}" for v in nums) if all(isinstance(v, (int, float)) for v in nums) else ""
        extra = f" at step {html.escape(str(st['diverged_step']))}" if st.get("diverged_step") is not None else ""
        if st.get("status") in ("failed", "damaged") and st.get("error"):  # why, on the index itself
            extra = f": {html.escape((str(st['error']).splitlines() or [''])[0][:200])}"
        run_rows.append(f'<tr><td><a href="{rel}">{html.escape(rd.id)}</a></td><td>{html.escape(str(st.get("status", "?")))}{extra}</td>'
                        f"<td>{acc}</td></tr>")
    sections.append("<h2>Runs</h2><table><tr><th>run</th><th>status</th><th>best val acc / test acc at it</th></tr>"
                    + "".join(run_rows) + "</table>")

    if unreadable:
        sections.append("<h2>Notebooks that could not be rendered</h2><ul>" + "".join(unreadable) + "</ul>")
    index = rep / "index.html"
    rep.mkdir(parents=True, exist_ok=True)
    css = " ".join(f"tr.{o} td.outcome{{color:{c}}}" for o, c in OUTCOME_CSS.items())
    atomic_write(index, f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>bnlib report</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
td,th{{padding:2px 10px;text-align:left}} tr:nth-child(even){{background:#f4f4f4}}
table.verdicts td{{vertical-align:top}} table.verdicts td.outcome{{font-weight:bold;white-space:nowrap}}
{css} small.at-budget{{color:#555;font-weight:normal}} details summary{{cursor:pointer}}
p.sentence{{margin:4px 0 6px 0;max-width:60em}}</style></head>
<body><h1>bnlib report</h1><p>outputs: <code>{html.escape(os.fspath(out.resolve()))}</code></p>
{''.join(sections)}</body></html>""".encode())
    return index


# ----------------------------------------------------------------------------------------------
# the README's verdict table (make readme): every number from verdicts.json, none typed
# ----------------------------------------------------------------------------------------------

README_BEGIN = "<!-- verdicts: from make study -->"
README_END = "<!-- /verdicts -->"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _readme_verdict(v: Verdict) -> str:
    """'claim in a few words: **outcome (cause)**, effect [95% CI], n = 5 seeds'."""
    n, _ = _n(v)
    parts = [f"{_md(claim_words(v))}: **{_md(v.label)}**"]
    if at_budget_text(v):
        parts.append(_md(at_budget_text(v)))
    parts += [x for x in (_md(effect_text(v)), f"n = {_md(n)}" if n else "") if x]
    return ", ".join(parts)


def readme_table(out, old_block: str = "") -> str:
    """The markdown table between README_BEGIN and README_END: one row per study of bnlib's own
    (a plugin's study is in the report, not in bnlib's README): its paper and notebook link (from
    the study registry), what its study tests (the text of that study's row in `old_block` where there is one: prose a person wrote, kept; else the
    registry's Study.doc), and each verdict of out/studies/<study>/verdicts.json. Raises
    ConfigError when a study has no verdicts or they cannot be read."""
    out = Path(os.fspath(out)).expanduser()
    tests = {}
    for line in old_block.splitlines():
        cells = _cells(line) if line.lstrip().startswith("|") else []
        m = re.search(r"notebooks/([^)\s]+\.ipynb)", cells[0]) if len(cells) >= 3 else None
        if m:
            tests[m.group(1)] = cells[1]
    found, missing, presets = {}, [], {}
    own = sorted(n for n, s in STUDIES.items() if s.source is None)  # the README is bnlib's: plugins' studies go to the report
    for name in own:
        path = out / "studies" / name / "verdicts.json"
        if not path.exists():
            missing.append(name)
            continue
        try:
            found[name] = load_verdicts(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable verdicts ({type(e).__name__}: {e}); rerun the study "
                              f"(python -m bnlib study {name} --out {out})") from e
        presets[name] = str(_manifest(path.parent / "manifest.json").get("preset", ""))
    if not found:
        raise ConfigError(f"out={str(out)!r}: no verdicts (no studies/<study>/verdicts.json for any of "
                          f"{own}); run `make study` (or python -m bnlib study all --out {out}) first")
    if missing:
        raise ConfigError(f"out={str(out)!r}: no verdicts for {missing} (have {sorted(found)}); the README's "
                          f"table covers every study: run them (python -m bnlib study all --out {out})")
    used = set(presets.values())
    one = next(iter(used)) if len(used) == 1 and "" not in used else None
    head = f"headline verdicts ({one} preset)" if one else "headline verdicts"
    rows = [f"| paper | what its study tests | {head} |", "|---|---|---|"]
    for name, verdicts in found.items():
        s = STUDIES[name]
        tag, _, rest = s.title.partition(" · ")
        paper = f"**{_md(tag)}** {_md(rest)}" if rest else f"**{_md(s.title)}**"
        if s.notebook:
            paper += f"<br>[`{Path(s.notebook).name}`](notebooks/{s.notebook})"
        what = tests.get(s.notebook or "", _md(s.doc))
        shown = "<br>".join(_readme_verdict(v) for v in verdicts)
        if one is None:
            shown = f"[{_md(presets[name] or 'preset unknown')}] {shown}"
        rows.append(f"| {paper} | {what} | {shown} |")
    return "\n".join(rows)


def rewrite_block(readme, begin_mark: str, end_mark: str, make) -> str:
    """Rewrite the text between `begin_mark` and `end_mark` in the file `readme` with
    make(old_block); every byte outside the block is kept. Returns the new block. Raises
    ConfigError when the markers are missing or out of order (nothing is written then, nor when
    `make` raises)."""
    readme = Path(os.fspath(readme)).expanduser()
    if not readme.is_file():
        raise ConfigError(f"readme={str(readme)!r}: not a file; pass the README.md to update")
    text = readme.read_text()
    begin, end = text.find(begin_mark), text.find(end_mark)
    if begin < 0 or end < begin or text.count(begin_mark) != 1 or text.count(end_mark) != 1:
        raise ConfigError(f"readme={str(readme)!r}: needs exactly one {begin_mark!r} followed by one "
                          f"{end_mark!r} around the block it rewrites")
    start = begin + len(begin_mark)
    block = make(text[start:end])
    atomic_write(readme, (text[:start] + "\n" + block + "\n" + text[end:]).encode())
    return block


def readme_verdicts(out="outputs", readme="README.md") -> str:
    """Rewrite the verdict table between README_BEGIN and README_END in `readme` with
    readme_table(out) (rewrite_block). Raises ConfigError when the markers are missing or out of
    order, or when verdicts are missing (nothing is written then)."""
    return rewrite_block(readme, README_BEGIN, README_END, lambda old: readme_table(out, old))
