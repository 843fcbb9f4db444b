"""Scenarios: an ordered list of steps, each naming a dataset, its classes and its domain.

Whether a step is a task, class or domain increment follows from what is new in it:
a dataset never seen before is a task step; new classes of a seen dataset in a seen domain are a
class step; seen classes in a new domain are a domain step. Presets are YAML files in
data/scenarios/; any user file in the same format works the same way.

    name: my-scenario
    steps:
      - {dataset: cifar100, classes: "0-9"}             # label indices, end exclusive
      - {dataset: cifar100, classes: [apple, bear]}      # or names
      - {dataset: domainnet, classes: all, domain: sketch}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.registry import DATA_DIR, NameSet, load_dataset_names
from ..errors import UserError

SCENARIO_DIR = DATA_DIR / "scenarios"


@dataclass(frozen=True)
class Step:
    dataset: str
    classes: tuple[str, ...]
    labels: tuple[int, ...]  # the classes' label indices in the dataset
    domain: str
    kind: str  # "base", "task", "class", "domain", "class+domain" or "revisit"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: tuple[Step, ...]

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(s.dataset for s in self.steps))


def known_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def _resolve_classes(spec, names: NameSet, where: str) -> tuple[int, ...]:
    n = len(names.classes)
    if spec is None or spec == "all":
        return tuple(range(n))
    if isinstance(spec, str) and "-" in spec and spec.replace("-", "").isdigit():
        lo, hi = (int(v) for v in spec.split("-"))
        if not 0 <= lo < hi <= n:
            raise UserError(f"{where}: class range {spec} is outside 0-{n} of dataset {names.dataset}")
        return tuple(range(lo, hi))
    if not isinstance(spec, list) or not spec:
        raise UserError(f"{where}: classes must be all, a range like 0-10, or a list of names or label indices")
    index = {c.lower(): i for i, c in enumerate(names.classes)}
    out = []
    for c in spec:
        if isinstance(c, int) and not isinstance(c, bool):
            if not 0 <= c < n:
                raise UserError(f"{where}: label {c} is outside 0-{n - 1} of dataset {names.dataset}")
            out.append(c)
        elif isinstance(c, str) and c.lower() in index:
            out.append(index[c.lower()])
        else:
            raise UserError(f"{where}: unknown class '{c}' in dataset {names.dataset}")
    if len(set(out)) != len(out):
        raise UserError(f"{where}: a class is listed twice")
    return tuple(out)


def _kind(t: int, dataset: str, labels: tuple[int, ...], domain: str, seen: dict) -> str:
    if t == 0:
        return "base"
    if dataset not in seen:
        return "task"
    new_classes = bool(set(labels) - seen[dataset]["labels"])
    new_domain = domain not in seen[dataset]["domains"]
    if new_classes and new_domain:
        return "class+domain"
    return "class" if new_classes else "domain" if new_domain else "revisit"


def parse_scenario(raw, name: str) -> Scenario:
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise UserError(f"scenario {name}: expected a mapping with a non-empty `steps:` list")
    steps, seen = [], {}
    for t, entry in enumerate(raw["steps"]):
        where = f"scenario {name}, step {t + 1}"
        if not isinstance(entry, dict) or "dataset" not in entry:
            raise UserError(f"{where}: each step needs `dataset:` (and optionally classes, domain)")
        unknown_keys = set(entry) - {"dataset", "classes", "domain"}
        if unknown_keys:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown_keys))}; use dataset, classes, domain")
        try:
            names = load_dataset_names(str(entry["dataset"]))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        domain = entry.get("domain") or (names.domains[0] if names.domains else "default")
        if names.domains and domain not in names.domains:
            raise UserError(f"{where}: unknown domain '{domain}' of dataset {names.dataset}; "
                            f"known: {', '.join(names.domains)}")
        labels = _resolve_classes(entry.get("classes"), names, where)
        kind = _kind(t, names.dataset, labels, domain, seen)
        steps.append(Step(names.dataset, tuple(names.classes[i] for i in labels), labels, domain, kind))
        s = seen.setdefault(names.dataset, {"labels": set(), "domains": set()})
        s["labels"] |= set(labels)
        s["domains"].add(domain)
    return Scenario(str(raw.get("name") or name), str(raw.get("description") or ""), tuple(steps))


def load_scenario(name_or_path: str) -> Scenario:
    """A preset by name, or a scenario YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise UserError(f"unknown scenario '{name_or_path}'; presets: {', '.join(known_scenarios()) or 'none'} "
                            "(or a YAML file of steps)")
        path = preset
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(f"cannot read scenario {path}: {reason}") from None
    return parse_scenario(raw, path.stem)
