"""The report's verdict thresholds: one class, used by the sweep's config (``report.*``), the report and
``quanteval-report``'s flags (generated from these fields).

Torch-free and import-free, so both the config and the report can use it without importing each other.

>>> Thresholds().survives
0.97
>>> try:
...     Thresholds(survives=2)
... except ValueError as e:
...     print(e)
report.survives=2: must be in (collapses, 1] (collapses=0.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class ThresholdError(ValueError):
    """A threshold outside its range; ``str`` names it as a config key, ``flag()`` as a report CLI flag."""

    def __init__(self, name: str, value: Any, rule: str):
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"report.{name}={value}: {rule}")

    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}={self.value}: {self.rule}"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class Thresholds:
    """Verdict thresholds (documented defaults); set in config (``report.*``) or on the report's CLI.

    The rules, checked on construction: 0 < collapses < survives <= 1; 0 < kl_survives < kl_collapses;
    0 < top1_collapses < top1_survives <= 1; 0 <= floor < 1; every chance level in [0, 1); n_boot >= 100.
    """

    survives: float = field(default=0.97, metadata=_help("retained quality (score / baseline's) at or above: survives"))
    collapses: float = field(default=0.5, metadata=_help("retained quality below: collapses"))
    kl_survives: float = field(default=0.1, metadata=_help("mean KL to the baseline below: survives"))
    kl_collapses: float = field(default=1.0, metadata=_help("mean KL at or above: collapses"))
    top1_survives: float = field(default=0.9, metadata=_help("same-top-token rate at or above: survives"))
    top1_collapses: float = field(default=0.5, metadata=_help("same-top-token rate below: collapses"))
    floor: float = field(default=0.05, metadata=_help("a baseline within this of chance is 'at floor': judged by fidelity"))
    chance: dict[str, float] = field(default_factory=dict, metadata=_help("task -> chance level, e.g. {hellaswag: 0.25}"))
    n_boot: int = field(default=1000, metadata=_help("bootstrap resamples per CI"))

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "chance":
                if not isinstance(v, dict):
                    raise ThresholdError("chance", v, "must be a mapping task -> chance level")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ThresholdError(f.name, v, "must be a number")
        rules = [
            ("collapses", 0 < self.collapses < self.survives, f"must be in (0, survives) (survives={self.survives})"),
            ("survives", self.collapses < self.survives <= 1, f"must be in (collapses, 1] (collapses={self.collapses})"),
            ("kl_survives", 0 < self.kl_survives < self.kl_collapses,
             f"must be in (0, kl_collapses) (kl_collapses={self.kl_collapses})"),
            ("kl_collapses", self.kl_collapses > self.kl_survives, f"must be > kl_survives ({self.kl_survives})"),
            ("top1_collapses", 0 < self.top1_collapses < self.top1_survives,
             f"must be in (0, top1_survives) (top1_survives={self.top1_survives})"),
            ("top1_survives", self.top1_collapses < self.top1_survives <= 1,
             f"must be in (top1_collapses, 1] (top1_collapses={self.top1_collapses})"),
            ("floor", 0 <= self.floor < 1, "must be in [0, 1)"),
            ("n_boot", self.n_boot >= 100 and float(self.n_boot).is_integer(), "must be an integer >= 100"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ThresholdError(name, getattr(self, name), rule)
        for task, c in self.chance.items():
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1:
                raise ThresholdError(f"chance.{task}", c, "a chance level must be in [0, 1)")

    @classmethod
    def flags(cls) -> list[tuple[str, float, str]]:
        """(field, default, help) of each numeric threshold: the report CLI's ``--<field>`` flags."""
        d = cls()
        return [(f.name, getattr(d, f.name), f.metadata.get("help", "")) for f in fields(cls) if f.name != "chance"]
