"""Type stubs for the plan-object plumbing (see _plan_objects.pyx): C-level API only."""

from typing_extensions import disjoint_base

@disjoint_base
class HintInts: ...
