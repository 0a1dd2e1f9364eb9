"""Your own arm in a paper's study: `study p1 --plugins my_norm.py --arms +my_norm`.

An arm spec is `+NAME` (the norm NAME on BN's learning-rate ladder), `+NAME@ARM` (on the ladder
of the study's arm ARM) or `+NAME:LR1,LR2,...` (a ladder of its own, in the study's ladder units:
P1's are base rates at batch 128, scaled with the batch size as its own arms' are). `with_arms`
returns the study with one more sub-grid per arm: the study's grid with `norm` fixed to the arm,
its rungs from its ladder, every other axis (seeds, batch sizes, depths) as the study's arms
have them. A study whose grid has no `norm` axis takes no arm. The verdict functions compare
whatever arms the runs hold, so the new arm enters every comparison the study makes across arms.

`prepare` is what run_study, --plan and the CLI call: it imports the plugins, adds the arms, and
gives the plugin list every point carries (the explicit ones, and the files the study's and the
arms' entries came from), so that each kernel and worker imports them before it validates.
"""
from __future__ import annotations

import dataclasses
import math
import re

from .errors import ConfigError
from .norms import NORMS, norm_names
from .plugins import from_env, parse, resolve
from .config import load_plugins
from .studies import STUDIES, Preset, Study, get_study

__all__ = ["ArmSpec", "parse_arm", "parse_arms", "with_arms", "prepare", "use_arms"]


def parse_arms(value) -> list[str]:
    """`arms` as a list: a list as given; a string split at each comma before a '+' (so a ladder
    of its own, '+my_norm:0.01,0.04,0.16', stays one arm: '+a:0.01,0.1,+b@bn' is two)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [a.strip() for a in re.split(r",(?=\s*\+)", value) if a.strip()]
    return [str(a) for a in value]

_SPEC = re.compile(r"\+([A-Za-z_][A-Za-z0-9_]*)(?:@([A-Za-z_][A-Za-z0-9_]*)|:([^@]+))?")


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    name: str  # the norm (a registry name)
    like: str = "bn"  # the study arm whose ladder (or sweep) it uses when it has none of its own
    ladder: tuple = ()  # its own rungs, in the study's ladder units

    def text(self) -> str:
        return f"+{self.name}" + (f":{','.join(f'{x:g}' for x in self.ladder)}" if self.ladder else
                                  f"@{self.like}" if self.like != "bn" else "")


def _axes(p: Preset) -> set:
    return {*p.grid, *(k for g in p.subgrids for k in g)}


def _norms(p: Preset) -> list:
    return list(dict.fromkeys([*p.grid.get("norm", []), *(n for g in p.subgrids for n in g.get("norm", []))]))


def parse_arm(spec: str, study: Study) -> ArmSpec:
    """One `--arms` entry, checked against the norm registry and the study's own arms."""
    m = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ConfigError(f"arms={spec!r}: not an arm; valid forms: '+NAME' (BN's ladder), '+NAME@ARM' (the ladder "
                          f"of the study's arm ARM), '+NAME:LR1,LR2,LR3' (a ladder of its own)")
    name, like, ladder = m.group(1), m.group(2) or "bn", m.group(3)
    if name not in NORMS:
        raise ConfigError(f"arms={spec!r}: {name!r} is not a known norm; valid choices: {norm_names()} (a norm of "
                          f"your own: load its plugin with --plugins / plugins=[...])")
    own = sorted({n for p in study.presets.values() for n in _norms(p)})
    if not own:
        raise ConfigError(f"arms={spec!r}: study {study.name!r} has no norm axis to add an arm to; studies that "
                          f"compare norms: {[s.name for s in STUDIES.values() if any(_norms(p) for p in s.presets.values())]}")
    if name in own:
        raise ConfigError(f"arms={spec!r}: {name!r} is already an arm of study {study.name!r} ({own})")
    if like not in own:
        raise ConfigError(f"arms={spec!r}: '@{like}': not an arm of study {study.name!r}; valid choices: {own}")
    rungs = ()
    if ladder is not None:
        try:
            rungs = tuple(float(x) for x in ladder.split(",") if x.strip())
        except ValueError:
            rungs = ()
        if not rungs or any(not math.isfinite(x) or x <= 0 for x in rungs):
            raise ConfigError(f"arms={spec!r}: the ladder after ':' must be learning rates > 0 separated by commas, "
                              f"e.g. '+{name}:0.01,0.03,0.1'")
    return ArmSpec(name, like, rungs)


def _arm_preset(p: Preset, derive0, arm: ArmSpec) -> Preset:
    """The preset with `arm` as one more sub-grid (the study's grid, norm fixed to it)."""
    if "norm" not in _axes(p):
        return p
    sub = {"norm": [arm.name]}
    rung_axis = "lr_rung" in _axes(p)
    if arm.ladder and rung_axis:
        sub["lr_rung"] = list(range(len(arm.ladder)))
    elif arm.ladder and "lr" in _axes(p):
        sub["lr"] = list(arm.ladder)
    elif arm.like != "bn" or rung_axis:  # the reference arm's own sub-grid, if it has one (its ladder length)
        ref = next((g for g in p.subgrids if arm.like in g.get("norm", [])), None)
        sub.update({k: v for k, v in (ref or {}).items() if k != "norm"})
    ladders = dict(p.ladders or {})

    def derive(point: dict) -> dict:
        if point.get("norm") != arm.name or derive0 is None:
            return derive0(point) if derive0 is not None else {}
        rung = point.get("lr_rung")
        ref = {**point, "norm": arm.like}
        if arm.ladder and rung is not None:
            ref["lr_rung"] = 0
        out = derive0(ref)
        for k in set(point) - set(ref):  # what the study's derive consumed (lr_rung, replicate)
            point.pop(k)
        out.pop("norm", None)
        if arm.ladder and rung is not None and "lr" in out:
            base = (ladders.get(arm.like) or ())[:1]
            if not base:
                raise ConfigError(f"arms={arm.text()!r}: the study gives no ladder for {arm.like!r} to scale "
                                  f"an own ladder by; use '+{arm.name}@{arm.like}'")
            out["lr"] = round(out["lr"] * arm.ladder[rung] / base[0], 10)  # the study's rule (e.g. ×B/128)
        return out

    subgrids = (*(p.subgrids or ({},)), sub)
    return dataclasses.replace(p, subgrids=subgrids, derive=derive,
                               ladders={**ladders, arm.name: arm.ladder or ladders.get(arm.like, ())})


def with_arms(study: Study, arms) -> Study:
    """`study` with the arms of `arms` (specs, see the module docstring) added to each preset
    whose grid varies `norm`. The study keeps its name: its runs, notebook and verdicts are the
    study's, with one arm more."""
    specs = [a if isinstance(a, ArmSpec) else parse_arm(a, study) for a in arms]
    names = [a.name for a in specs]
    if len(set(names)) < len(names):
        raise ConfigError(f"arms={[a.text() for a in specs]}: an arm is given twice")
    presets = {}
    for key, p in study.presets.items():
        for a in specs:
            p = _arm_preset(p, p.derive or study.derive, a)
        presets[key] = p
    return dataclasses.replace(study, presets=presets, extra_arms=(*study.extra_arms, *(a.text() for a in specs)))


def prepare(study, plugins=None, arms=None) -> tuple[Study, list[str]]:
    """Import the plugins (None: BNLIB_PLUGINS), find the study, add the arms. Returns the study
    and the plugins every point carries: the given ones, plus the files the study's and the arms'
    registry entries came from (a plugin imported in this session without naming it)."""
    given = [resolve(p) for p in (parse(plugins) if plugins is not None else from_env())]
    load_plugins(given)
    study = get_study(study) if isinstance(study, str) else study
    if arms:
        study = with_arms(study, parse_arms(arms))
    carried = list(given)
    sources = [study.source, *(NORMS[a.lstrip("+").split("@")[0].split(":")[0]].source for a in study.extra_arms)]
    for src in sources:
        path = (src or {}).get("path")
        if path and path.endswith(".py") and path not in carried:
            carried.append(path)
    return study, carried


def use_arms(name: str, arms) -> Study:
    """The CLI's form: the registered study `name` replaced, in this process, by itself with
    `arms` (so --plan and the runner see the arms by the study's name)."""
    study = with_arms(get_study(name), parse_arms(arms))
    STUDIES[name] = study
    return study
