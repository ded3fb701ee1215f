"""How an intervention is written outside Python: one declaration per kind, read by the CLI and the explorer.

========  ==================  =================  ==========================================
kind      command line        explorer request   intervention
========  ==================  =================  ==========================================
ablate    ``--ablate T``      ``{"kind": "ablate", "target": T, "how": "zero"|"mean"}``  ``Ablate(T, how)``
scale     ``--scale T=F``     ``{"kind": "scale", "target": T, "factor": F}``           ``Scale(T, F)``
set       ``--set T=V``       ``{"kind": "set", "target": T, "value": V}``              ``Set(T, V)``
========  ==================  =================  ==========================================

:data:`FORMS` is the table: the ``generate`` command's options take their help and parsing
from it, and the explorer's request schema is built from it (``lmatlas.web.editing``), so a
kind added here reaches both. Interventions that carry tensors (``Add``, ``Project``,
``Patch``, ``Learned``) are written in Python or saved edit files, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from lmatlas.errors import InputError


@dataclass(frozen=True)
class Form:
    """One intervention kind as text: ``option TARGET[=VALUE]`` on the command line, a JSON item in the explorer.

    Attributes:
        kind: the name in both places (``"scale"``).
        cls: the name of the intervention class it makes (in :data:`~lmatlas.edit.interventions.INTERVENTIONS`;
            a name, so that reading the forms imports no torch).
        value: the field the number fills (``"factor"``), or ``None`` for a bare target.
        bound: the largest magnitude the explorer accepts for the number.
        choices: a text field with its allowed values and default (``("how", ("zero", "mean"))``).
        help: one line for ``--help`` and the schema.
    """

    kind: str
    cls: str
    value: str | None
    help: str
    bound: float = 0.0
    choices: tuple[str, tuple[str, ...]] | None = None

    @property
    def option(self) -> str:
        return f"--{self.kind}"

    @property
    def usage(self) -> str:
        return "TARGET" if self.value is None else f"TARGET={self.value.upper()}"

    def parse(self, text: str) -> tuple[str, float | None]:
        """``"L7.H2=2"`` -> ``("L7.H2", 2.0)`` (``"L5.H3"`` -> ``("L5.H3", None)`` for a bare target)."""
        if self.value is None:
            if not text.strip():
                raise InputError(f"{self.option} needs a target, e.g. {self.option} L5.H3.")
            return text.strip(), None
        target, sep, number = text.partition("=")
        if not sep or not target.strip() or not number.strip():
            raise InputError(f"{self.option} {text!r}: give {self.usage}, e.g. {self.option} L7.H2=2.")
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"{self.option} {text!r}: {number.strip()!r} is not a number.") from None
        if not math.isfinite(value):
            raise InputError(f"{self.option} {text!r}: the {self.value} must be a finite number.")
        return target.strip(), value

    def make(self, target: str, value: float | None = None, **choices: Any) -> Any:
        """The intervention this form describes."""
        from lmatlas.edit.interventions import INTERVENTIONS

        kwargs = dict(choices)
        if self.value is not None:
            kwargs[self.value] = float(value)
        return INTERVENTIONS[self.cls](target, **kwargs)


#: Every intervention kind written as text, in the order the command line applies them.
FORMS = MappingProxyType(
    {
        form.kind: form
        for form in (
            Form(
                "ablate",
                "Ablate",
                None,
                "Zero-ablate a head, neuron or site (L5.H3); repeatable.",
                choices=("how", ("zero", "mean")),
            ),
            Form("scale", "Scale", "factor", "Multiply a target by a factor, e.g. L7.H2=2; repeatable.", bound=1000.0),
            Form("set", "Set", "value", "Clamp a target to a value, e.g. L28.N931=8; repeatable.", bound=10_000.0),
        )
    }
)
