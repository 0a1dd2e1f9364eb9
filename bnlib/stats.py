"""The supported / contradicted / inconclusive decision every study's verdict uses, with the
sentence that states it, in one place; the effects it decides on (learning-rate selection on
validation, paired effects over replicates with intervals and p-values) are bnlib.effects',
re-exported here.

A verdict is what a reader quotes, so the rules are strict and stated here once:
- arms are compared at their own learning rate, chosen by mean *validation* accuracy over
  seeds (`select_lr`); test accuracy is only reported at that choice;
- the unit of replication is what is independent: the seed (REPLICATE), which fixes the
  initial weights and the data order. Runs that share a seed in several grid cells are one
  replicate: their paired differences are averaged over the cells within the seed and tested
  across seeds. Where every cell has seeds of its own, the cells are strata of a stratified t
  (`by_replicate`). n always counts replicates, and says so (Effect.n_unit);
- an effect is the mean of paired differences over replicates, with a Student-t interval and
  a one- or two-sided t-test (scipy.stats.ttest_1samp on the differences, as P2's paired test);
  identical differences have no interval and decide nothing;
- a claim is `inconclusive` whenever a guard fails (the reference arm does not beat chance,
  or does not beat the no-normalization arm significantly, an arm's rate sits at an end of its
  ladder, too few replicates), when the interval crosses the decision threshold, or when the
  claim is about long-run accuracy and the runs trained for under a tenth of the paper's steps
  (`Budget`: the statistics at this budget stay in the sentence, labelled); `supported` when
  the whole interval lies on the claimed side of the threshold (and p <= alpha),
  `contradicted` when it lies on the other. Each reason carries a short cause (Verdict.causes)
  that the report shows beside the outcome.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import params_table
from .data import split_sizes, steps_per_epoch
from .effects import (ALPHA, LEVEL, REPLICATE, Effect, Share, at_selected_lr, beats_chance, by_replicate,
                      contrast_effect, paired_effect, rank_correlation, rank_correlation_difference, ratio_interval,
                      select_lr)
from .records import atomic_write

__all__ = ["Effect", "Verdict", "Budget", "Share", "select_lr", "at_selected_lr", "by_replicate", "paired_effect",
           "contrast_effect", "ratio_interval", "rank_correlation", "rank_correlation_difference", "beats_chance",
           "edge_guard", "decide", "decide_margin", "all_of", "verdict_table", "write_verdicts", "read_verdicts",
           "OUTCOMES", "REPLICATE", "MIN_RANKED", "run_steps", "ALPHA", "LEVEL"]


OUTCOMES = ("supported", "contradicted", "inconclusive")
MIN_RANKED = 5  # a rank correlation across fewer units (arms) decides nothing
BUDGET_SHARE = 0.1  # a long-run claim needs at least this share of the paper protocol's steps


@dataclass(frozen=True)
class Budget:
    """How long the runs trained against the paper protocol: a claim about final or long-run
    accuracy decided on fewer than BUDGET_SHARE of the paper's steps is inconclusive as a verdict
    on the paper's claim; its statistics at this budget stay in the sentence, labelled."""

    steps: int
    paper_steps: int

    @property
    def too_short(self) -> bool:
        return self.steps < BUDGET_SHARE * self.paper_steps

    def text(self) -> str:
        return f"{self.steps:,} of the paper's {self.paper_steps:,} steps".replace(",", " ")

    @classmethod
    def of_runs(cls, runs: pd.DataFrame, paper_steps: int) -> "Budget":
        """The runs' SGD steps (the median over runs, from their parameters: epochs × steps per
        epoch, each missing parameter at its default) against `paper_steps`."""
        return cls(run_steps(runs), int(paper_steps))


def run_steps(runs: pd.DataFrame) -> int:
    """Median SGD steps per run, computed from the runs' parameters as the training loop does."""
    defaults = {k: p.default for _, k, p in params_table()}
    steps = []
    for row in runs.to_dict("records"):
        cfg = {**defaults, **{k: v for k, v in row.items() if k in defaults and not _missing(v)}}
        n = split_sizes(cfg)[2]
        steps.append(int(cfg["epochs"]) * steps_per_epoch(n, int(cfg["batch_size"]), bool(cfg["drop_last"])))
    return int(np.median(steps)) if steps else 0


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass
class Verdict:
    """One claim's verdict: the outcome, the sentence a reader quotes, and the numbers behind it."""

    study: str
    claim: str
    outcome: str
    sentence: str
    effects: list = field(default_factory=list)
    reasons: list = field(default_factory=list)  # why it is not supported/contradicted, in full
    causes: list = field(default_factory=list)  # the same, a word or two each (the report's index)
    short: str = ""  # the claim in a few words (the report's index and forest plot)
    at_budget: str = ""  # with a Budget too short: the outcome these runs give at their own budget
    threshold: float = 0.0  # what the effect is compared with (the forest plot's reference line)

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome={self.outcome!r}; valid choices: {list(OUTCOMES)}")
        if self.reasons and not self.causes:
            self.causes = [_cause(r) for r in self.reasons]

    @property
    def label(self) -> str:
        """The outcome with its cause, e.g. 'inconclusive (budget)'."""
        causes = list(dict.fromkeys(self.causes))
        return f"{self.outcome} ({', '.join(causes)})" if causes and self.outcome == "inconclusive" else self.outcome


def _cause(reason: str) -> str:
    """A reason's cause in a word or two (for reasons given without one)."""
    r = reason.lower()
    for key, cause in (("budget", "budget"), ("ladder", "ladder edge"), ("interval crosses", "interval crosses"),
                       ("reaches beyond", "interval crosses"), ("identical", "no interval"),
                       ("no confidence interval", "no interval"), ("not significant", "not significant"),
                       ("only ", "too few replicates"), ("diverged", "diverged"), ("learn", "arm at chance"),
                       ("chance", "arm at chance"), ("undefined", "share undefined")):
        if key in r:
            return cause
    return "guard"


# ----------------------------------------------------------------------------------------------
# the decision
# ----------------------------------------------------------------------------------------------

def edge_guard(choice: pd.DataFrame, arm_col: str, arms, cells: list[str] = ()) -> tuple[bool, str, str]:
    """Guard: every arm a claim compares has its learning rate chosen strictly inside its ladder
    (select_lr's table). A choice at an end leaves the arm's optimum unknown: it may lie beyond,
    and the arm's accuracy (so every gain and share computed from it) is then biased. A one-rung
    ladder is a rate fixed in advance (bnlib.ladders: on validation runs of other seeds), not a
    choice, and passes; so does an arm that diverged at every rung (no rate trained to choose:
    the claim's own guards say whether it trains). Returns (ok, reason, cause)."""
    c = choice[choice[arm_col].isin(list(arms))]
    if "diverged_at_choice" in c:  # diverged at every rung: no rate was chosen (the claim says so)
        c = c[~c["diverged_at_choice"].astype(bool)]
    bad = []
    for arm, g in c.groupby(arm_col, sort=False):
        edge = g["lr_at_grid_edge"].astype(bool)
        if edge.any():
            where = [", ".join(f"{k} {r[k]}" for k in cells) for _, r in g[edge].iterrows()] if cells else []
            lrs = sorted({f"{v:g}" for v in g.loc[edge, "lr"]})
            bad.append(f"{arm} at lr {'/'.join(lrs)}" + (f" ({'; '.join(where)})" if where else ""))
    return (not bad, "learning rate chosen at an end of its ladder (its optimum may lie beyond): " + "; ".join(bad),
            "ladder edge")


def _guards(guards) -> tuple[list[str], list[str]]:
    """Failed guards -> (reasons, causes). A guard is (ok, reason) or (ok, reason, cause)."""
    reasons, causes = [], []
    for g in guards:
        if not g[0]:
            reasons.append(g[1])
            causes.append(g[2] if len(g) > 2 else _cause(g[1]))
    return reasons, causes


def _min_units(effect: Effect, min_pairs: int | None) -> tuple[str, str] | None:
    need = min_pairs if min_pairs is not None else MIN_RANKED if "ranked" in effect.n_unit else 3
    if effect.n < need:
        return f"only {effect.n} {effect.n_unit} (need >= {need})", "too few replicates"
    return None


def _finish(study, claim, outcome, effect_text, what, reasons, causes, effects, budget, short, threshold):
    """The sentence and the Verdict; a too-short Budget turns a decided outcome into
    'inconclusive (budget)' and keeps the at-budget outcome in the sentence, labelled."""
    at_budget = ""
    body = f"{what + ': ' if what else ''}{effect_text}"
    if budget is not None and budget.too_short:
        at_budget = outcome
        reasons = reasons + [f"budget: {budget.text()} (under {BUDGET_SHARE:.0%}), too short for a claim about "
                             f"long-run accuracy"]
        causes = causes + ["budget"]
        body = f"at {budget.text()}: {body} ({at_budget} at this budget)"
        outcome = "inconclusive"
    word = outcome.upper()
    sentence = f"{claim}: {word} by these runs — {body}"
    if reasons:
        sentence += "; " + "; ".join(r for r in reasons if not r.startswith("budget:") or not at_budget)
    return Verdict(study, claim, outcome, sentence.rstrip("; ") + ".", effects, reasons, causes, short, at_budget,
                   threshold)


def decide(study: str, claim: str, effect: Effect, threshold: float = 0.0, direction: str = "greater",
           guards=(), min_pairs: int | None = None, pct: bool = False, what: str = "",
           budget: Budget | None = None, short: str = "") -> Verdict:
    """The verdict on `claim` from `effect` (a paired effect or contrast) against `threshold`.
    direction 'greater': the claim says effect > threshold. Every failed guard (ok, reason[,
    cause]) makes it inconclusive and says why; so does an interval that crosses the threshold,
    too few replicates (3; MIN_RANKED units for a rank correlation), and a `budget` too short
    for a claim about long-run accuracy (pass it only for such claims)."""
    reasons, causes = _guards(guards)
    few = _min_units(effect, min_pairs)
    if few:
        reasons.append(few[0])
        causes.append(few[1])
    sign = 1 if direction == "greater" else -1
    lo, hi = sorted((sign * (effect.lo - threshold), sign * (effect.hi - threshold)))
    if reasons:
        outcome = "inconclusive"
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        outcome = "inconclusive"
        reasons.append(f"no confidence interval ({effect.why_no_interval or 'n < 2'})")
        causes.append("no interval")
    elif lo > 0 and effect.p <= ALPHA:
        outcome = "supported"
    elif hi < 0:
        outcome = "contradicted"
    elif lo > 0:
        outcome = "inconclusive"
        reasons.append(f"not significant (p={effect.p:.2g} > {ALPHA})")
        causes.append("not significant")
    else:
        outcome = "inconclusive"
        reasons.append(f"the 95% interval crosses the threshold {threshold:+g}")
        causes.append("interval crosses")
    return _finish(study, claim, outcome, effect.text(pct=pct), what, reasons, causes, [asdict(effect)], budget,
                   short, threshold)


def decide_margin(study: str, claim: str, effect: Effect, margin: float, guards=(), one_sided: bool = False,
                  min_pairs: int | None = None, what: str = "", budget: Budget | None = None,
                  short: str = "") -> Verdict:
    """A claim that two arms are alike rather than different, decided on the 95% interval of
    their paired difference: equivalence ("a matches b": the whole interval inside ±margin) or,
    with one_sided, non-inferiority ("a is not worse than b by more than margin": the whole
    interval above −margin). Contradicted when the interval lies wholly beyond the margin on the
    wrong side; inconclusive when it straddles it or a guard fails. The interval, not the p-value
    against 0 in the sentence, decides: a two-sided 95% interval inside the margin is the two
    one-sided tests at 2.5% each (TOST)."""
    reasons, causes = _guards(guards)
    few = _min_units(effect, min_pairs)
    if few:
        reasons.append(few[0])
        causes.append(few[1])
    lo, hi = effect.lo, effect.hi
    if reasons:
        outcome = "inconclusive"
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        outcome = "inconclusive"
        reasons.append(f"no confidence interval ({effect.why_no_interval or 'n < 2'})")
        causes.append("no interval")
    elif lo > -margin and (one_sided or hi < margin):
        outcome = "supported"
    elif hi < -margin or (not one_sided and lo > margin):
        outcome = "contradicted"
    else:
        outcome = "inconclusive"
        reasons.append(f"the 95% interval reaches beyond {'−' if one_sided else '±'}{margin:g}")
        causes.append("interval crosses")
    return _finish(study, claim, outcome, effect.text(), what, reasons, causes, [asdict(effect)], budget, short,
                   -margin if one_sided else 0.0)


def all_of(study: str, claim: str, parts: list[Verdict], short: str = "") -> Verdict:
    """A claim made of parts: supported when every part is, contradicted when any part is,
    inconclusive otherwise; the sentence carries each part's."""
    def combine(outs):
        return ("contradicted" if "contradicted" in outs else "supported" if outs and set(outs) == {"supported"}
                else "inconclusive")

    outcome = combine([v.outcome for v in parts])
    # parts held back by the budget alone: the combined outcome at this budget, kept
    at_budget = combine([v.at_budget or v.outcome for v in parts]) if any(v.at_budget for v in parts) else ""
    # what held it back: the parts not supported (inconclusive), or those that differ from it
    off = [v for v in parts if (v.outcome != "supported" if outcome == "inconclusive" else v.outcome != outcome)]
    reasons = [f"{v.claim}: {v.label}" for v in off]
    causes = list(dict.fromkeys(c for v in off for c in (v.causes or [v.outcome])))
    sentence = f"{claim}: {outcome.upper()} by these runs — " + " ".join(v.sentence for v in parts)
    return Verdict(study, claim, outcome, sentence, [e for v in parts for e in v.effects], reasons, causes, short,
                   at_budget, parts[0].threshold if parts else 0.0)


def verdict_table(verdicts: list[Verdict]) -> pd.DataFrame:
    """One row per verdict: study, claim (in a few words where given), outcome with its cause,
    effect and interval, p, n and what it counts, and the reasons in full."""
    rows = []
    for v in verdicts:
        e = v.effects[0] if v.effects else {}
        rows.append({"study": v.study, "claim": v.short or v.claim, "outcome": v.label, "effect": e.get("mean"),
                     "ci_low": e.get("lo"), "ci_high": e.get("hi"), "p": e.get("p"), "n": e.get("n"),
                     "unit": e.get("n_unit", ""), "why": "; ".join(v.reasons)})
    return pd.DataFrame(rows, columns=["study", "claim", "outcome", "effect", "ci_low", "ci_high", "p", "n", "unit",
                                       "why"])


def write_verdicts(out, study: str, verdicts: list[Verdict]) -> Path:
    """outputs/studies/<study>/verdicts.json: read by the report's index and the summary."""
    path = Path(out) / "studies" / study / "verdicts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps([asdict(v) for v in verdicts], indent=1, default=float).encode())
    return path


_VERDICT_FIELDS = set(Verdict.__dataclass_fields__)


def read_verdicts(out) -> list[Verdict]:
    """Every study's verdicts under an outputs folder (unreadable files are skipped)."""
    found = []
    for p in sorted(Path(out).glob("studies/*/verdicts.json")):
        try:
            found += [Verdict(**{k: x for k, x in v.items() if k in _VERDICT_FIELDS}) for v in json.loads(p.read_text())]
        except (OSError, ValueError, TypeError):
            continue
    return found
