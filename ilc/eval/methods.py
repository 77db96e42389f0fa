"""The ways `ilc eval` runs the model, as a registry: `METHODS[name]` is a small frozen `Method`.

Like kvpress's presses, each method is one object with one apply / undo pair: `apply(model, plan, context)` makes
`model` run the method for a prompt of `context` tokens (a plan derived from the plan under test, see
`ilc.eval.baselines`, or nothing for the dense model), `undo(model)` restores it. Every method runs on ilc's own
runtime, so one cache, attention and byte accounting serve them all.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ilc.runtime import Plan, remove_plan

from ilc.runtime.bits import HeadPrecision

from .baselines import (equal_memory_selection, equal_memory_window, quantized_plan, selection_plan, streaming_plan,
                        uniform_plan)


@dataclass(frozen=True)
class Method:
    """One way of running the model: the plan it applies for a prompt of `context` tokens (`plan_for`)."""

    name: str
    description: str
    mode: str | None = None  # override of the applied plan's mode
    runs_plan: bool = False  # runs the plan under test itself (on the adapted weights when the plan is adapted)
    needs_plan: bool = True  # its records depend on the plan under test (the dense model's do not)

    def plan_for(self, plan: Plan, context: int) -> Plan | None:
        """The plan to apply (None: the dense model)."""
        raise NotImplementedError

    def apply(self, model, plan: Plan, context: int) -> None:
        chosen = self.plan_for(plan, context)
        if chosen is not None:
            chosen.apply(model, mode=self.mode)

    def undo(self, model) -> None:
        remove_plan(model)


@dataclass(frozen=True)
class Dense(Method):
    needs_plan: bool = False

    def plan_for(self, plan: Plan, context: int) -> None:
        return None


@dataclass(frozen=True)
class PlanUnderTest(Method):
    runs_plan: bool = True

    def plan_for(self, plan: Plan, context: int) -> Plan:
        return plan


@dataclass(frozen=True)
class Streaming(Method):
    equal_memory: bool = False  # the window enlarged until the cache holds the plan's bytes; else the plan's window

    def plan_for(self, plan: Plan, context: int) -> Plan:
        return streaming_plan(plan, equal_memory_window(plan, context) if self.equal_memory else plan.window)


@dataclass(frozen=True)
class SelectionAlone(Method):
    def plan_for(self, plan: Plan, context: int) -> Plan:
        return selection_plan(plan, equal_memory_selection(plan, context))


@dataclass(frozen=True)
class Uniform(Method):
    size: int = 2  # layers per block

    def plan_for(self, plan: Plan, context: int) -> Plan:
        return uniform_plan(plan, self.size)


@dataclass(frozen=True)
class QuantizedAlone(Method):
    precision: str = "K4cV4"  # `HeadPrecision` name of every head

    def plan_for(self, plan: Plan, context: int) -> Plan:
        return quantized_plan(plan, HeadPrecision.parse(self.precision))


METHODS = {m.name: m for m in (
    Dense("full", "the uncompressed model (dense cache)"),
    PlanUnderTest("plan", "the plan in its own mode (scores: training-free; adapted plans on their adapted weights)"),
    PlanUnderTest("plan-keys", "the plan in keys mode (own query on the anchor's keys; for adapted models)",
                  mode="keys"),
    Streaming("streaming", "StreamingLLM with the plan's sinks and window (distant tokens dropped)"),
    Streaming("streaming-equal", "StreamingLLM with the window enlarged to the plan's bytes", equal_memory=True),
    SelectionAlone("selection-equal", "token selection alone (every head full, the plan's scorer, SnapKV's by "
                   "default) at the plan's bytes"),
    *(Uniform(f"uniform-{k}", f"uniform blocks of {k} layers, the plan's windows", size=k) for k in (2, 3, 4)),
    *(QuantizedAlone(f"int{bits}", f"quantization alone (KIVI-style): every head full, {name}, the plan's sinks and "
                     "residual at 16 bits", precision=name) for bits, name in ((8, "K8V8"), (4, "K4cV4"), (2, "K2cV2"))),
)}


@contextmanager
def applied(method: str, model, plan: Plan, context: int, adapted_model=None):
    """Run `method` inside the block on the model it yields: `adapted_model` (the weights with an adapted plan's
    adapter merged) for the methods that run the plan under test, else `model`; restores it after."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[method]
    chosen = adapted_model if adapted_model is not None and spec.runs_plan else model
    spec.apply(chosen, plan, context)
    try:
        yield chosen
    finally:
        spec.undo(chosen)
