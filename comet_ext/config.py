"""CometConfig: the CoMeT memory's sizes (docs/model.md, "What is computed"), validated."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CometConfig:
    """Sizes of the CoMeT memory. Defaults are the reference implementation's.

    Attributes:
        chunk_size: text tokens per chunk.
        num_global: global memory slots, = readout tokens per closed chunk.
        temp_stride: one compression token after every `temp_stride` text
            tokens; -1 disables the temporary memory (FIFO).
        temp_budget: FIFO capacity in rows (0 also disables it).
        rla_rank: rank of every residual low-rank adapter.
        gate_snap: in (0, 1]; a global-memory gate above it is used as exactly 1, so a
            closed slot keeps its state bit for bit over any number of chunks instead of
            leaking a little at every update (training passes the gradient straight
            through). 1.0 (the reference's behaviour) never snaps. Not part of the state's
            shape: it may be changed on a trained model.
    """

    chunk_size: int = 2048
    num_global: int = 512
    temp_stride: int = 8
    temp_budget: int = 2048
    rla_rank: int = 8
    gate_snap: float = 1.0

    def __post_init__(self) -> None:
        for name in ("chunk_size", "num_global", "temp_stride", "temp_budget", "rla_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"CometConfig.{name} must be an int, got {value!r}")
        if self.chunk_size < 1:
            raise ValueError(f"CometConfig.chunk_size must be >= 1, got {self.chunk_size}")
        if self.num_global < 1:
            raise ValueError(f"CometConfig.num_global must be >= 1, got {self.num_global}")
        if self.temp_stride != -1 and self.temp_stride < 1:
            raise ValueError(f"CometConfig.temp_stride must be -1 (no temporary memory) or >= 1, got {self.temp_stride}")
        if self.temp_budget < 0:
            raise ValueError(f"CometConfig.temp_budget must be >= 0, got {self.temp_budget}")
        if self.rla_rank < 1:
            raise ValueError(f"CometConfig.rla_rank must be >= 1, got {self.rla_rank}")
        snap = self.gate_snap
        if isinstance(snap, bool) or not isinstance(snap, (int, float)) or not 0 < snap <= 1:
            raise ValueError(f"CometConfig.gate_snap must be a number in (0, 1] (1 = never snap), got {snap!r}")
        object.__setattr__(self, "gate_snap", float(snap))

    @property
    def uses_temp_memory(self) -> bool:
        return self.temp_stride != -1 and self.temp_budget > 0

    @property
    def fifo_capacity(self) -> int:
        """Rows of the FIFO: temp_budget, or 0 without temporary memory."""
        return self.temp_budget if self.uses_temp_memory else 0

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CometConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"CometConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
