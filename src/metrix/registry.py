"""What exists, and what each entry needs: losses, miners, backbones and classical learners.

Every entry knows its factory, the arguments its caller must supply (``num_classes``, ``input_shape``), its
own parameters with their defaults (read from the signature, so they cannot drift from the code), whether
it takes a miner's pairs, and the geometries it trains in (a loss class declares ``geometries``). The
command line builds ``--loss``/``--miner`` choices, ``--loss-param`` checks and ``metrix list`` from here,
so no loss needs a special case outside its own module.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

SUPPLIED = {"num_classes", "embedding_dim", "input_shape"}  # arguments a caller fills in, not user settings


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    kind: str
    needs: tuple[str, ...] = ()
    takes_pairs: bool = False
    geometries: tuple[str, ...] = ("sphere",)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The first sentence of the docstring (of the function a "module form" wraps), without markup."""
        doc = inspect.getdoc(self.factory) or ""
        wrapped = re.match(r"Module form of :func:`(\w+)`", doc)
        if wrapped:
            import metrix.losses

            doc = inspect.getdoc(getattr(metrix.losses, wrapped.group(1), None)) or doc
        text = re.sub(r":\w+:`([^`]+)`|``([^`]+)``", lambda m: m.group(1) or m.group(2), doc.split("\n\n")[0])
        text = " ".join(text.split())
        first = re.split(r"(?<=[a-z0-9)])[.:] ", text, maxsplit=1)[0].rstrip(".")
        return first if len(first) <= 110 else first[:107].rstrip() + "..."

    def line(self) -> str:
        """One line for ``metrix list``."""
        parts = [f"{self.name:<22}"]
        if self.needs:
            parts.append(f"needs {', '.join(self.needs)};")
        if self.takes_pairs:
            parts.append("takes --miner;")
        if self.geometries != ("sphere",):
            parts.append(f"geometries {', '.join(self.geometries)};")
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        parts.append(f"params: {shown or '-'}")
        return " ".join(parts) + (f" — {self.summary}" if self.summary else "")

    def check_params(self, given: dict) -> dict:
        """``given`` if every key is a parameter of this entry, else ``ValueError`` listing the valid ones."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f"{self.kind} {self.name!r} has no parameter {', '.join(unknown)}; its parameters are "
                             f"{', '.join(self.params) or 'none'}")
        return dict(given)


def _parameters(factory: Callable, skip: set[str]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        if name == "self" or name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def losses() -> dict[str, Entry]:
    from metrix.losses import LOSSES

    out = {}
    for name, (cls, needs_classes) in LOSSES.items():
        takes_pairs = "pairs" in inspect.signature(cls.forward).parameters
        out[name] = Entry(name, cls, "loss", ("num_classes", "embedding_dim") if needs_classes else (), takes_pairs,
                          tuple(getattr(cls, "geometries", ("sphere",))), _parameters(cls, SUPPLIED))
    return out


def miners() -> dict[str, Entry]:
    from metrix.mining import MINERS

    return {name: Entry(name, cls, "miner", params=_parameters(cls, SUPPLIED)) for name, cls in MINERS.items()}


def backbones() -> dict[str, Entry]:
    from metrix.models import BACKBONES

    return {name: Entry(name, f, "backbone", ("input_shape",), params=_parameters(f, SUPPLIED))
            for name, f in BACKBONES.items()}


def learners() -> dict[str, Entry]:
    from metrix.classical import ESTIMATORS

    return {name: Entry(name, cls, "learner", params=_parameters(cls, SUPPLIED)) for name, cls in ESTIMATORS.items()}


# what `metrix train` starts a loss with where the paper's default suits a short run badly (flags win)
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {"triplet": {"margin": 0.2, "triplets": "semihard"}}

REGISTRIES: dict[str, Callable[[], dict[str, Entry]]] = {
    "losses": losses, "miners": miners, "backbones": backbones, "learners": learners,
}


SINGULAR = {"losses": "loss", "miners": "miner", "backbones": "backbone", "learners": "learner"}


def lookup(kind: str, name: str) -> Entry:
    """The entry ``name`` of registry ``kind`` (``losses``, ...), or ``ValueError`` listing the choices."""
    entries = REGISTRIES[kind]()
    if name not in entries:
        raise ValueError(f"unknown {SINGULAR[kind]} {name!r}; choose one of {', '.join(sorted(entries))} "
                         f"(metrix list {kind})")
    return entries[name]
