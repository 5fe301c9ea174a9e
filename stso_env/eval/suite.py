"""Evaluation suites: scenarios x corpora x seeds x controllers, as data (``configs/suites/<name>.yaml``).

A suite names the *cells* it covers (a scenario on a corpus), the controllers and seeds every cell
runs, and the run geometry shared by all (preset, steps, decision interval). ``agents.evaluate
--suite NAME`` runs every (cell, controller, seed) once, in parallel workers when asked, and writes
the committed results under ``assets/results/<name>/``. Loading is strict like every config here:
an unknown key, a wrong type or an unknown controller raises :class:`~stso_env.errors.ConfigError`
naming the key and the file.

Example::

    name: smoke
    description: two cells, two seeds, for tests
    steps: 60
    decision_interval: 10
    seeds: 2
    seed_offset: 100000
    controllers: [fixed, pbt, pbt_pair]
    variants:  # a controller again under other settings, reported under its own label
      pbt_pair: {controller: pbt, settings: {population: 2}}
      # a variant may also name a proxy (stso, proxy_only, single_trigger) or a policy of its own:
      # stso_other: {controller: stso, proxy: runs/other/proxy}
    cells:
      - {scenario: calm, corpus: builtin}
      - {scenario: spiky, corpus: ../shared/data/wikitext-2}

Relative corpus paths are taken from the repository root, so a suite runs the same from any folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stso_env.config import CONFIG_DIR, REPO_ROOT, _f, from_dict, load_yaml
from stso_env.errors import ConfigError

SUITE_DIR = CONFIG_DIR / "suites"


@dataclass
class CellConfig:
    """One scenario on one corpus."""

    scenario: str = _f("calm", "scenario name (configs/scenarios) or YAML path")
    corpus: str = _f("builtin", "'builtin' or a text file/folder path (relative paths: from the repository root)")
    tokenizer: str = _f("byte", "'byte' or a GPT-2 tokenizer folder (relative paths: from the repository root)")

    @property
    def name(self) -> str:
        """``<scenario>__<corpus tag>``: the cell's folder and table name."""
        corpus = "builtin" if self.corpus == "builtin" else Path(self.corpus.rstrip("/")).name
        tok = "" if self.tokenizer == "byte" else f"__{Path(self.tokenizer.rstrip('/')).name}"
        return f"{Path(self.scenario).stem}__{corpus}{tok}"

    def resolved(self) -> CellConfig:
        """Relative paths made absolute from the repository root."""
        def absolute(spec: str) -> str:
            if spec in ("builtin", "byte") or spec.startswith(("hf:", "gpt2:")) or Path(spec).is_absolute():
                return spec
            return str((REPO_ROOT / spec).resolve())

        scenario = self.scenario
        if scenario.endswith((".yaml", ".yml")) and not Path(scenario).is_absolute():
            scenario = str((REPO_ROOT / scenario).resolve())
        return CellConfig(scenario=scenario, corpus=absolute(self.corpus), tokenizer=absolute(self.tokenizer))


@dataclass
class SuiteConfig:
    """A whole suite (see the module docstring)."""

    name: str = _f("suite", "suite name: the results folder assets/results/<name>")
    description: str = _f("", "what the suite covers and why")
    preset: str = _f("tiny", "GPT-2 model size preset of every run")
    steps: int = _f(600, "optimizer steps of a full run; the FLOPs budget is their nominal cost", range=(2, 10**9))
    decision_interval: int = _f(10, "optimizer steps per env step", range=(1, 10**6))
    seeds: int = _f(5, "seeds per (cell, controller); the same for every controller", range=(1, 10**4))
    seed_offset: int = _f(100_000, "first seed (kept apart from collection and tuning seeds)", range=(0, 2**31))
    controllers: list[str] = _f(["fixed"], "controllers every cell runs (agents/controllers)")
    builtin_chars: int | None = _f(None, "characters of the built-in corpus (None: the TrainConfig default)",
                                   range=(10_000, 10**9))
    test_tokens: int = _f(131_072, "tokens of the final test perplexity (the whole test split when smaller)",
                          range=(65_536, 10**10))
    proxy: str | None = _f(None, "trained proxy folder for stso/proxy_only/single_trigger (None: prepared by "
                           "agents.train_controller into the suite's run folder)")
    policy: str | None = _f(None, "policy.zip for 'policy' (None: prepared like the proxy)")
    settings: dict[str, Any] = _f({}, "controller name -> constructor settings")
    variants: dict[str, Any] = _f({}, "label -> {controller: NAME, settings: {...}, proxy: DIR, policy: ZIP}: a "
                                  "controller run again under other settings (and, optionally, another proxy or "
                                  "policy), listed in controllers and reported under its label")
    cells: list[CellConfig] = field(default_factory=list, metadata={"help": "scenario x corpus cells"})
    readme: bool = _f(False, "the README's result tables are generated from this suite")
    report_copy: str | None = _f(None, "also write the report to this path (from the repository root)")

    @property
    def seed_list(self) -> list[int]:
        return [self.seed_offset + i for i in range(self.seeds)]

    def controller_of(self, name: str) -> str:
        """The registry controller behind ``name`` (a variant's controller, else ``name`` itself)."""
        return self.variants[name]["controller"] if name in self.variants else name

    @property
    def variant_controllers(self) -> dict[str, str]:
        """Each variant's label -> its registry controller."""
        return {label: self.controller_of(label) for label in self.variants}

    def proxy_of(self, name: str) -> str | None:
        """The proxy folder ``name`` scores with: its variant's own ``proxy``, else the suite's."""
        return self.variants.get(name, {}).get("proxy") or self.proxy

    def policy_of(self, name: str) -> str | None:
        """The policy ``name`` plays: its variant's own ``policy``, else the suite's."""
        return self.variants.get(name, {}).get("policy") or self.policy

    def settings_of(self, name: str) -> dict[str, Any]:
        """The constructor settings ``name`` runs under."""
        return dict(self.variants[name].get("settings") or {}) if name in self.variants else \
            dict(self.settings.get(name, {}))


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def load_suite(spec: str, known_controllers: tuple[str, ...] | None = None) -> SuiteConfig:
    """A suite by name (``configs/suites/<name>.yaml``) or path, validated strictly.

    ``known_controllers``: the registry's names (the programs pass them; the library does not import
    the controllers), so a misspelt controller fails before any run starts.
    """
    path = Path(spec)
    if not (spec.endswith((".yaml", ".yml")) or path.is_file()):
        path = SUITE_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise ConfigError(f"suite: {spec!r} is neither a file nor a known suite; known: "
                          f"{', '.join(available_suites()) or 'none'}")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite must be a mapping with 'name', 'controllers' and 'cells'")
    cells = raw.get("cells") or []
    if not isinstance(cells, list) or not cells:
        raise ConfigError(f"{path}: cells: give a non-empty list of {{scenario: NAME, corpus: SPEC}}")
    parsed = [from_dict(CellConfig, c, source=str(path), prefix=f"cells[{j}].") for j, c in enumerate(cells)]
    suite = from_dict(SuiteConfig, {k: v for k, v in raw.items() if k != "cells"}, source=str(path))
    suite.cells = parsed
    names = [c.name for c in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: cells: {', '.join(dup)} listed twice")
    if not suite.controllers:
        raise ConfigError(f"{path}: controllers: give at least one controller")
    if len(set(suite.controllers)) != len(suite.controllers):
        raise ConfigError(f"{path}: controllers: a controller is listed twice")
    for label, v in suite.variants.items():
        where = f"{path}: variants.{label}"
        if not isinstance(v, dict) or "controller" not in v or set(v) - {"controller", "settings", "proxy", "policy"}:
            raise ConfigError(f"{where}: expected {{controller: NAME, settings: {{...}}, proxy: DIR, policy: ZIP}} "
                              f"(all but controller optional), got {v!r}")
        if not isinstance(v.get("settings") or {}, dict):
            raise ConfigError(f"{where}.settings: expected a mapping of constructor settings")
        for key, what in (("proxy", "a proxy folder"), ("policy", "a policy.zip")):
            if key in v and not (isinstance(v[key], str) and v[key]):
                raise ConfigError(f"{where}.{key}: expected the path of {what}, got {v[key]!r}")
        if known_controllers is not None and label in known_controllers:
            raise ConfigError(f"{where}: the label is a controller's name; give the variant a label of its own")
        if v["controller"] in suite.variants:
            raise ConfigError(f"{where}.controller: {v['controller']!r} is a variant itself; name a controller")
        if known_controllers is not None:
            if v["controller"] not in known_controllers:
                raise ConfigError(f"{where}.controller: unknown controller {v['controller']!r}; allowed: "
                                  f"{', '.join(known_controllers)}")
        if label not in suite.controllers:
            raise ConfigError(f"{where}: not listed in controllers; add {label} there or drop the variant")
    if known_controllers is not None:
        unknown = [c for c in suite.controllers if c not in known_controllers and c not in suite.variants]
        unknown += [c for c in suite.settings if c not in known_controllers]
        if unknown:
            raise ConfigError(f"{path}: controllers/settings: unknown controller(s) {', '.join(unknown)}; allowed: "
                              f"{', '.join(known_controllers)}")
    if suite.steps % suite.decision_interval or suite.steps < 2 * suite.decision_interval:
        raise ConfigError(f"{path}: steps: {suite.steps} must be a multiple of decision_interval "
                          f"({suite.decision_interval}) of at least two windows")
    bad = [k for k, v in suite.settings.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{path}: settings.{bad[0]}: expected a mapping of constructor settings")
    return suite
