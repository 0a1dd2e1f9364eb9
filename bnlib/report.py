"""The HTML report: every executed notebook under an outputs folder rendered with nbconvert
into `<out>/report/`, and an index.html linking the summary, each study and each run.

Pages open offline: figures are embedded, and the template (bnlib/report_template) loads no
script from the network. Code cells are hidden by default, with a button to show them.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import nbformat

from .errors import ConfigError
from .records import RunDir, atomic_write

__all__ = ["build_report", "render_notebook"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "report_template"


def render_notebook(src: Path, dst: Path, index_href: str) -> None:
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_template_basedirs=[str(TEMPLATE_DIR.parent)], template_name=TEMPLATE_DIR.name)
    nb = nbformat.read(str(src), as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"bnlib_index": index_href,
                                                         "metadata": {"name": src.stem}})
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, body.encode())


def _has_error(nb_path: Path) -> bool:
    nb = nbformat.read(str(nb_path), as_version=4)
    return any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _verdict_list(path: Path) -> str:
    """The study's verdict sentences (written by its analysis notebook), so a reader sees the
    conclusions on the index, next to the link; nothing when there are none yet."""
    try:
        verdicts = json.loads(path.read_text())
        items = "".join(f'<li class="{html.escape(v["outcome"])}"><b>{html.escape(v["outcome"])}</b>: '
                        f'{html.escape(v["sentence"])}</li>' for v in verdicts)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or not bnlib's shape
        return ""
    return f'<ul class="verdicts">{items}</ul>'


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
        dst = rep / rel
        depth = len(Path(rel).parts) - 1
        try:
            render_notebook(src, dst, "../" * depth + "index.html")
        except Exception as e:  # noqa: BLE001 — nbformat/nbconvert raise several kinds
            unreadable.append(f"<li><code>{html.escape(str(src))}</code>: {html.escape(type(e).__name__)}: "
                              f"{html.escape(str(e)[:200])}</li>")
            return None
        return rel

    if (out / "summary.ipynb").exists() and (rel := page(out / "summary.ipynb", "summary.html")):
        sections.append(f'<h2>Summary</h2><p><a href="{rel}">summary of every run: accuracy, loss stability, '
                        f'γ/β drift</a>{" (has errors)" if _has_error(out / "summary.ipynb") else ""}</p>')
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
        study_rows.append(f'<li><a href="{rel}">{html.escape(title)}</a> [{preset}]'
                          f'{" (has errors)" if _has_error(nb) else ""}{_verdict_list(nb.parent / "verdicts.json")}</li>')
    sections.append("<h2>Studies</h2><ul>" + ("".join(study_rows) or "<li>none run yet</li>") + "</ul>")

    run_rows = []
    for nb in sorted((out / "runs").glob("*/run.ipynb")):
        rd = RunDir(nb.parent)
        st = rd.status()
        if st is None:  # missing, unreadable or of the wrong shape: listed as damaged, with why
            st = {"status": "damaged", "error": rd.verify() or "status.json missing"}
        m = st.get("metrics") or {}
        rel = page(nb, f"runs/{rd.id}.html")
        if rel is None:
            continue
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
    atomic_write(index, f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>bnlib report</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
td,th{{padding:2px 10px;text-align:left}} tr:nth-child(even){{background:#f4f4f4}}
ul.verdicts li{{margin:4px 0}} li.supported b{{color:#1a7f37}} li.contradicted b{{color:#b42318}}
li.inconclusive b{{color:#9a6700}}</style></head>
<body><h1>bnlib report</h1><p>outputs: <code>{html.escape(os.fspath(out.resolve()))}</code></p>
{''.join(sections)}</body></html>""".encode())
    return index
