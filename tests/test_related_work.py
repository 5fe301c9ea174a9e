"""Every citation key in the code names an entry of assets/related_work.md, and every controller cites one."""

from __future__ import annotations

import re
from pathlib import Path

from agents.controllers import CONTROLLERS, controller_class

REPO = Path(__file__).resolve().parent.parent
KEY = re.compile(r"\b(1[89]\d\d|20\d\d)_[A-Z][A-Za-z0-9]+_[A-Za-z0-9]+\b")


def _entries() -> set[str]:
    text = (REPO / "assets" / "related_work.md").read_text(encoding="utf-8")
    return set(re.findall(r"^### (\S+)$", text, flags=re.M))


def test_cited_keys_exist() -> None:
    entries = _entries()
    assert "2017_Jaderberg_PBT" in entries
    missing = {}
    for path in list((REPO / "stso_env").rglob("*.py")) + list((REPO / "agents").rglob("*.py")):
        for m in KEY.finditer(path.read_text(encoding="utf-8")):
            if m.group(0) not in entries:
                missing.setdefault(m.group(0), str(path.relative_to(REPO)))
    assert not missing, f"cited keys without an entry in assets/related_work.md: {missing}"


def test_every_method_cites_its_paper() -> None:
    """The baselines and learned methods cite a key in their class docstring (fixed, the tuned schedule and a
    scripted plan are the project's own reference points; the oracle cites the idea it borrows)."""
    entries = _entries()
    for name in CONTROLLERS:
        if name in ("fixed", "tuned_fixed", "scripted"):
            continue
        cls = controller_class(name)
        # An ablation inherits its method's docstring (and so its references) from its base class.
        doc = "".join(c.__doc__ or "" for c in cls.__mro__ if c.__module__.startswith("agents.controllers"))
        keys = {m.group(0) for m in KEY.finditer(doc)}
        assert keys & entries, f"controller {name!r} ({cls.__module__}.{cls.__name__}) cites no related-work key"
