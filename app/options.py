"""One launch's engine options, and every rank's spec built from them the same way.

Rank 0, a local worker and a worker an agent starts all get their `RankSpec` from
`EngineOptions.rank_spec`; what differs between them is only where they run (device,
threads, model directory, shared memory). An agent receives the options whole in the
launch request (`wire()`), so a remote rank cannot silently differ from rank 0.
"""

from dataclasses import asdict, dataclass, fields

from llmd.engine.worker import RankSpec


@dataclass(frozen=True)
class EngineOptions:
    plan: dict
    device: str = "cpu"  # "cpu" or "cuda": the kind rank 0 and the local workers run on
    dtype: str = "float32"  # activations, KV cache and dense weights
    weights: str = "fp32"  # fp32, bf16, fp16 (dense) or int8, int4 (quantised at load)
    context: int = 2048
    slots: int = 1
    timeout_s: float = 120.0
    compile: bool = False
    reshardable: bool = False  # the balancer may move heads and columns
    slowdown: tuple[tuple[int, float, int], ...] = ()  # (rank, factor, from step): simulated slow devices

    def rank_spec(self, model_dir: str, rank: int, threads: int, device: str | None = None,
                  shm_path: str | None = None, wake_fds: list[int] | None = None) -> RankSpec:
        return RankSpec(model_dir=model_dir, plan=self.plan, rank=rank, device=device or self.device,
                        dtype=self.dtype, weights=self.weights, context=self.context, slots=self.slots,
                        threads=threads, timeout_s=self.timeout_s, compile=self.compile, shm_path=shm_path,
                        wake_fds=wake_fds, slowdown=[list(s) for s in self.slowdown] or None,
                        reshardable=self.reshardable)

    @classmethod
    def of(cls, spec: RankSpec) -> "EngineOptions":
        """The options a rank's spec was built from."""
        values = {f.name: getattr(spec, f.name) for f in fields(cls) if f.name != "slowdown"}
        return cls(**values, slowdown=tuple(tuple(s) for s in spec.slowdown or ()))

    def wire(self) -> dict:
        """What a launch request carries to the agents: all but the device kind, which each rank is given."""
        out = asdict(self)
        out.pop("device")
        out["slowdown"] = [list(s) for s in self.slowdown]
        return out
