"""The KV-policy registry: every KV cache policy registered once, by name.

``lmatlas generate --kv NAME``, the explorer playground's ``kv`` field and the docs' table of
policies are all read from :data:`KV_POLICIES`; registering a policy here is all it takes to
offer it everywhere. A policy is built from up to three *inputs*, each with one CLI option:

==========  ===============  ==============================================================
input       CLI option       what it is
==========  ===============  ==============================================================
``plan``    ``--kv-budget``  a :class:`~lmatlas.infer.plan.KVPlan`: which KV heads stay full
                             (from ``--atlas``, ``--random-seed``; windowed heads keep
                             ``Window(--sink, --recent)``)
``capacity`` ``--kv-snap``   prompt entries SnapKV keeps per KV head
``gates``   ``--kv-gates``   a JSON file of trained DuoAttention gates (``GateResult``)
==========  ===============  ==============================================================

Without ``--kv`` the policy follows from the one option given (``--kv-budget`` -> ``headwise``,
``--kv-snap`` -> ``snapkv``, ``--kv-gates`` -> ``gates``). This module imports no torch: the CLI
reads it at start-up; :meth:`PolicyKind.make` imports the value's module when it runs.

>>> sorted(KV_POLICIES)
['default', 'full-prefill', 'gates', 'headwise', 'hybrid', 'snapkv']
>>> get_policy("snapkv").inputs
('capacity',)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from lmatlas.errors import InputError, RegistryError

#: Each input of a policy -> the CLI option that gives it.
INPUT_OPTIONS = MappingProxyType({"plan": "--kv-budget", "capacity": "--kv-snap", "gates": "--kv-gates"})


@dataclass(frozen=True)
class PolicyKind:
    """One registered KV policy.

    Attributes:
        name: the name ``--kv`` and the playground's ``kv`` take.
        summary: one line for the help, the schema and the docs.
        value: ``"module:Class"`` of the policy value (``""`` for the default cache).
        inputs: what it is built from (keys of :data:`INPUT_OPTIONS`), in order.
        build: ``build(value_class, plan=..., capacity=..., gates=..., window=...)`` -> the policy value.
        implied: whether its first input alone selects it when no name is given (``--kv-budget`` ->
            ``headwise``); at most one policy per input.
        playground: ``""`` when the explorer's playground offers it, else why not.
    """

    name: str
    summary: str
    value: str
    inputs: tuple[str, ...]
    build: Callable[..., Any]
    implied: bool = False
    playground: str = ""

    def value_class(self) -> Any:
        """The class of the policy value (imports its module), ``None`` for the default cache."""
        if not self.value:
            return None
        module, name = self.value.split(":")
        return getattr(importlib.import_module(module), name)

    def make(self, **inputs: Any) -> Any:
        """The policy value from its inputs (``plan``, ``capacity``, ``gates``; ``window`` for gates)."""
        return self.build(self.value_class(), **inputs)

    def options(self, spelling: Mapping[str, str] = INPUT_OPTIONS) -> str:
        """The options it needs, e.g. ``"--kv-budget, --kv-snap"`` (``spelling``: input -> option name)."""
        return ", ".join(spelling[i] for i in self.inputs) or "none"


#: Every registered policy by name, in registration order.
KV_POLICIES: dict[str, PolicyKind] = {}


def register_policy(kind: PolicyKind) -> PolicyKind:
    """Add ``kind`` to :data:`KV_POLICIES` (a second policy of the same name is an error)."""
    if kind.name in KV_POLICIES:
        raise RegistryError(f"A KV policy named {kind.name!r} is already registered.")
    unknown = [i for i in kind.inputs if i not in INPUT_OPTIONS]
    if unknown:
        raise RegistryError(f"KV policy {kind.name!r} takes unknown inputs {unknown}: use {list(INPUT_OPTIONS)}.")
    if kind.implied and any(other.implied and other.inputs[0] == kind.inputs[0] for other in KV_POLICIES.values()):
        raise RegistryError(f"KV policy {kind.name!r}: another policy is already implied by {kind.inputs[0]!r}.")
    KV_POLICIES[kind.name] = kind
    return kind


def get_policy(name: str) -> PolicyKind:
    """A registered policy by name; an unknown name raises with the list of names."""
    try:
        return KV_POLICIES[name]
    except KeyError:
        raise InputError(f"Unknown KV policy {name!r}: use one of {', '.join(KV_POLICIES)}.") from None


def policy_names() -> tuple[str, ...]:
    return tuple(KV_POLICIES)


def implied_policy(given: set[str], spelling: Mapping[str, str] = INPUT_OPTIONS, name_option: str = "--kv") -> str:
    """The policy the given inputs select when no name is given (``"default"`` for none).

    ``given`` holds input names (``{"plan"}``); two inputs that select different policies are
    refused. ``spelling`` and ``name_option`` spell the options in messages (the CLI's by default;
    the explorer passes its field names).
    """
    chosen = [kind for kind in KV_POLICIES.values() if kind.implied and kind.inputs[0] in given]
    if len(chosen) > 1:
        options = " or ".join(f"{spelling[kind.inputs[0]]} ({kind.name})" for kind in chosen)
        both = [n for n, kind in KV_POLICIES.items() if set(kind.inputs) == given]
        hint = f"; to combine them, name the policy: {name_option} {both[0]}" if both else ""
        raise InputError(f"Give {options}, not both{hint}.")
    return chosen[0].name if chosen else "default"


def check_inputs(
    name: str, given: set[str], spelling: Mapping[str, str] = INPUT_OPTIONS, name_option: str = "--kv"
) -> PolicyKind:
    """The policy ``name``, raising unless ``given`` holds exactly the inputs it is built from."""
    kind = get_policy(name)
    missing = [spelling[i] for i in kind.inputs if i not in given]
    if missing:
        raise InputError(f"{name_option} {name} needs {', '.join(missing)}.")
    extra = [spelling[i] for i in INPUT_OPTIONS if i in given and i not in kind.inputs]
    if extra:
        raise InputError(f"{name_option} {name} does not read {', '.join(extra)} (it needs: {kind.options(spelling)}).")
    return kind


def _default(cls, **_: Any) -> None:
    return None


def _plan(cls, plan, **_: Any) -> Any:
    return plan


def _wrap(cls, plan, **_: Any) -> Any:
    return cls(plan)


def _snap(cls, capacity, **_: Any) -> Any:
    return cls(capacity=capacity)


def _hybrid(cls, plan, capacity, **_: Any) -> Any:
    return cls(plan, capacity=capacity)


def _gates(cls, gates, window=None, **_: Any) -> Any:
    return cls.of(gates) if window is None else cls.of(gates, window)


_GATES_OFFLINE = "needs gates trained on the model (lmatlas.infer.duo_gates.train_gates)"

for _kind in (
    PolicyKind("default", "transformers' own cache: every entry of every head", "", (), _default),
    PolicyKind(
        "headwise",
        "the plan's full KV heads keep every entry, the others sinks + a recent window, prefill included",
        "lmatlas.infer.plan:KVPlan",
        ("plan",),
        _plan,
        implied=True,
    ),
    PolicyKind(
        "full-prefill",
        "as headwise, but the prompt is read with full attention in every head before the cut",
        "lmatlas.infer.prefill_policy:FullPrefillPlan",
        ("plan",),
        _wrap,
    ),
    PolicyKind(
        "snapkv",
        "SnapKV: every KV head keeps the prompt entries the prompt's end attends to most",
        "lmatlas.infer.snap:SnapPlan",
        ("capacity",),
        _snap,
        implied=True,
    ),
    PolicyKind(
        "hybrid",
        "the plan's full KV heads keep every entry, SnapKV chooses the others' prompt entries",
        "lmatlas.infer.hybrid:HybridPlan",
        ("plan", "capacity"),
        _hybrid,
    ),
    PolicyKind(
        "gates",
        "DuoAttention: each KV head mixes full and windowed attention by its trained gate",
        "lmatlas.infer.duo_gates:GatePlan",
        ("gates",),
        _gates,
        implied=True,
        playground=_GATES_OFFLINE,
    ),
):
    register_policy(_kind)
