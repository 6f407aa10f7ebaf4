"""EngineConfig: the one settings object of an engine (the scheduler's limits, the KV cache's size, the GPU
path's switches), validated once when the engine is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from mistral7b.errors import RequestError
from mistral7b.kernels.tuning import DecodeTuning


@dataclass
class EngineConfig:
    max_model_len: int
    chunk_size: int = 512  # the most tokens of one sequence computed in one step (pre-fill chunk)
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # per-step token budget; default max(chunk_size, max_num_seqs)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for keys and values; default 1 GiB on CPU, on a GPU as below
    gpu_memory_utilization: float = 0.9  # share of the card's whole memory for this engine (engine/kv_memory.py)
    num_blocks: int | None = None  # overrides kv_cache_memory
    enable_prefix_caching: bool = True
    attention: str = "auto"  # "torch", "triton" (the paged kernel), or auto: the kernel on CUDA
    cuda_graphs: bool = True  # decode-only steps replayed from CUDA graphs (kernel path on CUDA only)
    async_scheduling: bool | None = None  # greedy decode steps launched one ahead of the host's bookkeeping;
    # None: on where decode steps replay CUDA graphs (measured there: bench/README.md), off elsewhere
    tuning: DecodeTuning = field(default_factory=DecodeTuning)  # how GPU decode steps launch (kernels/tuning.py)

    def validate(self) -> None:
        if not isinstance(self.tuning, DecodeTuning):
            raise RequestError(f"tuning must be a DecodeTuning, got {type(self.tuning).__name__}")
        self.tuning.validate()
        for name in ("enable_prefix_caching", "cuda_graphs", "async_scheduling"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "async_scheduling" and value is None):
                raise RequestError(f"{name} must be true or false, got {value!r}")
        for name in ("max_model_len", "chunk_size", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        value = self.gpu_memory_utilization
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise RequestError(f"gpu_memory_utilization must be in (0, 1], got {value!r}")
        for name in ("max_num_batched_tokens", "kv_cache_memory", "num_blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
