"""What a reader sees first, on constructed verdicts (no training): the report's index gives
each claim one row with its outcome *and its cause*, the full sentence one click away; old
verdicts.json files still show; the forest plot renders headless; the README's verdict table is
generated from verdicts.json and nothing else in the README changes."""
import json
import math
import re
import runpy
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere

import nbformat  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from bs4 import BeautifulSoup  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from bnlib import plots, stats  # noqa: E402
from bnlib.errors import ConfigError  # noqa: E402
from bnlib.report import README_BEGIN, README_END, build_report, readme_verdicts  # noqa: E402
from bnlib.studies import STUDIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAN = math.nan


def _edge_choice() -> pd.DataFrame:
    """select_lr's table for a `none` arm whose best validation accuracy is at the top rung."""
    runs = pd.DataFrame([{"norm": n, "lr": lr, "seed": s, "best_val_acc": acc + 0.01 * s, "status": "completed"}
                         for n, accs in {"bn": [0.5, 0.8, 0.6], "none": [0.3, 0.4, 0.5]}.items()
                         for lr, acc in zip([0.01, 0.1, 1.0], accs) for s in range(3)])
    return stats.select_lr(runs, ["norm"])


def _verdicts(study: str) -> list[stats.Verdict]:
    """One verdict per outcome and per cause the index must name."""
    E = stats.Effect
    seeds = "seeds (each the mean over its 2 cells)"
    return [
        stats.decide(study, "BN beats no normalization at each arm's validated rate",
                     E("bn − none", 0.21, 0.12, 0.30, 0.002, 3, n_unit=seeds), short="BN > none"),
        stats.decide(study, "γ₀ = 0.1 beats γ₀ = 1 after full training", E("γ₀ 0.1 − γ₀ 1", -0.392, -0.507, -0.278,
                                                                          0.999, 5), budget=stats.Budget(64, 63360),
                     short="γ₀ 0.1 > γ₀ 1"),
        stats.decide(study, "AffineLayer keeps more than half of BN's gain", E("c", 0.05, 0.01, 0.09, 0.01, 3),
                     guards=[stats.edge_guard(_edge_choice(), "norm", ["bn", "none"])], short="affine > ½ gain"),
        stats.decide(study, "BatchNorm-minus keeps more than half of BN's gain", E("c", -0.2, -0.3, -0.1, 0.99, 3)),
        stats.decide(study, "Without BN one SGD step diverges at smaller step sizes",
                     E("d", 1.2, NAN, NAN, NAN, 3, why_no_interval="the 3 differences are identical"),
                     short="one step: BN tolerates more"),
        stats.decide_margin(study, "SkipInit is not worse than BN by more than 0.05", E("s − bn", 0.12, -0.18, 0.43,
                                                                                        0.3, 3),
                            0.05, one_sided=True, short="SkipInit ≥ BN − 0.05"),
    ]


def _study_folder(out: Path, name: str, preset: str = "quick") -> Path:
    d = out / "studies" / name
    d.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# study {name}")]),
                   str(d / f"{name}.ipynb"))
    (d / "manifest.json").write_text(json.dumps({"title": f"study {name}", "preset": preset}))
    return d


def _names(label: str, v: stats.Verdict) -> bool:
    """`label` is the claim in a few words: its short form, or the claim cut at a word with '…'."""
    return label == v.short if v.short else (label == v.claim or label.endswith("…") and
                                             v.claim.startswith(label[:-1]) and len(label) < len(v.claim))


def _numbers(text: str) -> list[float]:
    return [float(x.replace("−", "-")) for x in re.findall(r"[+−-]\d+\.\d+", text)]


def test_the_index_gives_each_claim_one_row_with_its_cause(tmp_path):
    vs = _verdicts("p1")
    assert [v.label for v in vs] == ["supported", "inconclusive (budget)", "inconclusive (ladder edge)",
                                     "contradicted", "inconclusive (no interval)", "inconclusive (interval crosses)"]
    _study_folder(tmp_path, "p1")
    stats.write_verdicts(tmp_path, "p1", vs)
    # written by an older bnlib: no short, causes, at_budget or threshold; effects without n_unit
    old = _study_folder(tmp_path, "p2")
    (old / "verdicts.json").write_text(json.dumps([{
        "study": "p2", "claim": "lr/100 for γ helps", "outcome": "inconclusive", "retired_field": 1,
        "sentence": "lr/100 for γ helps: INCONCLUSIVE by these runs — the 95% interval crosses the threshold +0.",
        "effects": [{"name": "c100 − c1", "mean": -0.06, "lo": -0.119, "hi": 0.001, "p": 0.9, "n": 6}],
        "reasons": ["the 95% interval crosses the threshold +0"]}]))
    (_study_folder(tmp_path, "p3") / "verdicts.json").write_text("{not json")
    _study_folder(tmp_path, "p4")  # ran, wrote no verdicts yet

    soup = BeautifulSoup(build_report(tmp_path).read_text(), "html.parser")
    table = soup.find("table", class_="verdicts")
    rows = [tr for tr in table.find_all("tr") if tr.find("td")]
    claim_rows = [tr for tr in rows if tr.find("details")]
    assert len(claim_rows) == len(vs) + 1
    for tr, v in zip(claim_rows, vs):
        assert tr["class"] == [v.outcome]  # coloured by outcome
        outcome = tr.find("td", class_="outcome").get_text(" ", strip=True)
        assert outcome.startswith(v.label)  # the outcome never without its cause
        summary, sentence = tr.find("summary").get_text(), tr.find("p", class_="sentence").get_text()
        assert _names(summary, v) and sentence == v.sentence  # the full sentence, one click away
        effect_cell, n_cell = tr.find_all("td")[-2:]
        e = v.effects[0]
        shown = _numbers(effect_cell.get_text())
        want = [e["mean"], e["lo"], e["hi"]] if math.isfinite(e["lo"]) else [e["mean"]]
        assert shown == pytest.approx(want, abs=5e-4)
        assert n_cell.get_text() == f"{e['n']} {e['n_unit'].split(' (')[0]}" and n_cell["title"] == e["n_unit"]
    budget_row = claim_rows[1].find("td", class_="outcome").get_text(" ", strip=True)
    assert "contradicted at 64 of the paper's 63 360 steps" in budget_row  # the statistics at this budget, labelled
    assert "no interval: the 3 differences are identical" in claim_rows[4].get_text()
    # the study cell spans its claims and links the study's page
    assert claim_rows[0].find("td")["rowspan"] == str(len(vs)) and claim_rows[0].find("a")["href"] == "studies/p1.html"
    # no sentence outside its <details>: the index is rows, not a wall of sentences
    for v in vs:
        assert sum(v.sentence in s for s in table.find_all(string=True)) == 1
    old_row = claim_rows[-1]
    assert old_row.find("td", class_="outcome").get_text(strip=True) == "inconclusive (interval crosses)"
    assert old_row.find_all("td")[-1].get_text() == "6"
    text = table.get_text(" ", strip=True)
    assert "verdicts.json unreadable: JSONDecodeError" in text and "no verdicts written yet" in text


def test_the_forest_plot_shows_every_claim_against_its_threshold(tmp_path):
    vs = _verdicts("p1") + [stats.Verdict("p4", "The BN arm learns (reference)", "supported", "The BN arm learns.")]
    fig = plots.forest(vs)
    axes = fig.axes
    assert len(axes) == 2 and [a.get_title(loc="left") for a in axes] == ["p1", "p4"]  # grouped by study
    ax = axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(vs) - 1 and all(_names(t, v) for t, v in zip(labels, vs))
    texts = [t.get_text() for t in ax.texts]
    for i, v in enumerate(vs[:-1]):
        assert any(t.startswith(v.label) for t in texts)  # the outcome with its cause, beside the row
        # the interval, in the outcome's colour, from lo to hi on the claim's row
        e = v.effects[0]
        if math.isfinite(e["lo"]):
            seg = [s for c in ax.collections for s, col in zip(c.get_segments(), c.get_colors())
                   if to_hex(col) == plots.OUTCOME_COLOURS[v.outcome] and s[0][1] == s[1][1] == -i]
            assert seg and sorted((seg[0][0][0], seg[0][1][0])) == pytest.approx([e["lo"], e["hi"]])
        # the threshold: a dashed tick on the row
        ticks = [s for c in ax.collections for s in c.get_segments() if s[0][0] == s[1][0] and s[0][1] < -i < s[1][1]]
        assert [s[0][0] for s in ticks] == pytest.approx([v.threshold])
    assert "no interval" in texts  # the point without an interval says so
    assert any(t.get_text() == "no estimate" for t in axes[1].texts)
    fig.savefig(tmp_path / "forest.png")
    assert (tmp_path / "forest.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="verdicts=\\[\\]"):
        plots.forest([])


def test_the_compact_table_has_whole_n_and_three_decimals():
    from bnlib.report import compact_table

    t = compact_table(_verdicts("p1"))
    assert list(t.columns) == ["study", "claim", "outcome", "effect", "ci_low", "ci_high", "p", "n", "unit"]
    assert str(t["n"].dtype) == "Int64" and t["n"].tolist() == [3, 5, 3, 3, 3, 3]
    assert t.loc[0, "unit"] == "seeds" and t.loc[1, "outcome"] == "inconclusive (budget)"
    assert t.loc[1, "effect"] == -0.392 and t.loc[1, "ci_low"] == -0.507
    assert all(_names(c, v) for c, v in zip(t["claim"], _verdicts("p1"))) and t.loc[3, "claim"].endswith("…")


README = f"""# title

Text before, kept as it is.

{README_BEGIN}
| paper | what its study tests | headline verdicts (quick preset) |
|---|---|---|
| **P1** old<br>[`p1_ablation.ipynb`](notebooks/studies/p1_ablation.ipynb) | prose a person wrote \\| with a pipe | old verdicts |
{README_END}

Text after, kept too: 0.123 [0.1, 0.2].
"""


def _own():
    """bnlib's own studies (a plugin's study, registered by another test in this process, is not
    the README's)."""
    return sorted(n for n, s in STUDIES.items() if s.source is None)


def _all_studies(out: Path, skip=()) -> dict:
    written = {}
    for name in _own():
        if name in skip:
            continue
        _study_folder(out, name)
        written[name] = _verdicts(name)
        stats.write_verdicts(out, name, written[name])
    return written


def test_the_readme_table_is_generated_from_the_verdicts_only(tmp_path):
    written = _all_studies(tmp_path / "out")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    readme_verdicts(tmp_path / "out", readme)
    text = readme.read_text()
    before, after = README.split(README_BEGIN)[0], README.split(README_END)[1]
    assert text.startswith(before + README_BEGIN) and text.endswith(README_END + after)
    block = text.split(README_BEGIN)[1].split(README_END)[0].strip().splitlines()
    assert block[0] == "| paper | what its study tests | headline verdicts (quick preset) |"
    rows = block[2:]
    assert len(rows) == len(_own()) == 5
    for row, name in zip(rows, _own()):
        paper, what, shown = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
        s = STUDIES[name]
        assert f"](notebooks/{s.notebook})" in paper and f"**{s.title.split(' · ')[0]}**" in paper
        assert what == ("prose a person wrote \\| with a pipe" if name == "p1" else s.doc)
        items = shown.split("<br>")
        assert len(items) == len(written[name])
        for item, v in zip(items, written[name]):
            assert _names(item.split(": **")[0], v) and f"**{v.label}**" in item
            e = v.effects[0]
            want = [e["mean"], e["lo"], e["hi"]] if math.isfinite(e["lo"]) else [e["mean"]]
            assert _numbers(item) == pytest.approx(want, abs=5e-4)  # every number from verdicts.json
            assert item.endswith(f"n = {e['n']} {e['n_unit'].split(' (')[0]}")
    readme_verdicts(tmp_path / "out", readme)  # again: the same table
    assert readme.read_text() == text


def test_the_readme_generator_fails_clearly_and_writes_nothing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="no verdicts.*make study"):
        readme_verdicts(tmp_path / "out", readme)
    missing = _own()[-1]
    _all_studies(tmp_path / "out", skip=[missing])
    with pytest.raises(ConfigError, match=f"no verdicts for \\['{missing}'\\]"):
        readme_verdicts(tmp_path / "out", readme)
    assert readme.read_text() == README
    readme.write_text(README.replace(README_END, ""))
    with pytest.raises(ConfigError, match="readme=.*/verdicts"):
        readme_verdicts(tmp_path / "out", readme)


def test_the_readme_script_updates_a_readme_and_exits_nonzero_without_verdicts(tmp_path, monkeypatch, capsys):
    """scripts/readme_verdicts.py (make readme), run as a script in this process (a child
    process would spend its time importing torch)."""
    readme = tmp_path / "README.md"
    readme.write_text(README)
    script = str(ROOT / "scripts" / "readme_verdicts.py")
    monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path / "none"), "--readme", str(readme)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert str(e.value.code).startswith("readme_verdicts: out=") and "no verdicts" in str(e.value.code)
    _all_studies(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path / "out"), "--readme", str(readme)])
    runpy.run_path(script, run_name="__main__")
    assert f"({len(_own())} studies)" in capsys.readouterr().out
    assert "**inconclusive (budget)**" in readme.read_text()


def test_the_budget_note_only_adds_what_the_label_does_not_say():
    from bnlib.report import at_budget_text

    E, budget = stats.Effect, stats.Budget(64, 63360)
    decided = stats.decide("p2", "γ₀ = 0.1 beats γ₀ = 1", E("c", -0.39, -0.5, -0.28, 0.99, 5), budget=budget)
    assert decided.label == "inconclusive (budget)"
    assert at_budget_text(decided) == "contradicted at 64 of the paper's 63 360 steps"
    crossing = stats.decide("p2", "lr/100 for γ helps", E("c", 0.0, -0.1, 0.1, 0.5, 5), budget=budget)
    assert crossing.label == "inconclusive (interval crosses, budget)" and at_budget_text(crossing) == ""
