"""How much GPU memory the KV cache gets, sized as vLLM sizes it: a share of the whole card
(`gpu_memory_utilization`, 0.9 by default) for everything this engine holds, less what is already in use after
loading (the weights, the CUDA context, other processes), less the peak of the engine's largest step, measured by
running one, less a reserve for the decode graphs captured afterwards.

The step is measured on a throwaway engine over the same model with a small cache of its own and no graphs: a
full token budget of pre-fill spread over `max_num_seqs` sequences, each then sampled with top-p (the sampler's
sort is its largest buffer). Half the free memory, as before, left long outputs short of blocks (the 128-in /
2048-out grid ran at 45% of TensorRT-LLM's figure).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from mistral7b.errors import RequestError

if TYPE_CHECKING:
    from mistral7b.engine.config import EngineConfig
    from mistral7b.model.transformer import Transformer

GIB = 1 << 30
GRAPH_RESERVE = 512 << 20  # the decode graphs' memory pool (batches of at most max_num_seqs tokens)


def kv_bytes(total: int, free: int, step_peak: int, utilization: float) -> int:
    """Bytes left for keys and values: utilization * total, less what is in use (total - free), less a step's
    peak and the graphs' reserve; a RequestError that says which part is short when nothing is left."""
    allowed = utilization * total
    in_use = total - free
    left = int(allowed - in_use - step_peak - GRAPH_RESERVE)
    if left < GIB // 64:
        raise RequestError(
            f"no GPU memory is left for the KV cache: --gpu-memory-utilization {utilization:g} allows "
            f"{allowed / GIB:.1f} GiB of {total / GIB:.1f}, {in_use / GIB:.1f} GiB are in use (weights, other "
            f"processes) and a step needs {step_peak / GIB:.2f} GiB; raise --gpu-memory-utilization, lower "
            f"--max-num-batched-tokens or --max-num-seqs, or free the GPU")
    return left


def step_peak(model: Transformer, config: EngineConfig, device: torch.device,
              make_engine: Callable[[Transformer, EngineConfig], Any]) -> int:
    """Bytes a full step allocates beyond the KV cache: measured on a throwaway engine that `make_engine(model,
    config)` builds (the engine hands in its own constructor; see the module's docstring), its own cache
    subtracted."""
    from mistral7b.cache.paged import PagedKVCache
    from mistral7b.engine.sampling_params import SamplingParams

    rows = config.max_num_seqs
    budget = config.max_num_batched_tokens or max(config.chunk_size, rows)
    length = max(1, min(budget // rows, config.chunk_size, config.max_model_len - 1))
    blocks = rows * (math.ceil((length + 1) / config.block_size) + 1)
    probe_config = replace(config, num_blocks=blocks, cuda_graphs=False, async_scheduling=False,
                           enable_prefix_caching=False)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe = make_engine(model, probe_config)
    vocab = probe.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95, ignore_eos=True)
    for i in range(rows):
        probe.add_request(i, torch.randint(0, vocab, (length,), generator=g).tolist(), params)
    while probe.has_unfinished():
        probe.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    cache_bytes = (blocks + 1) * PagedKVCache.block_bytes(model.args, config.block_size, model.dtype)
    del probe
    gc.collect()  # the throwaway engine's cache and buffers, before the real cache is sized
    torch.cuda.empty_cache()
    return max(0, peak - cache_bytes)


def cuda_kv_memory(model: Transformer, config: EngineConfig, device: torch.device,
                   make_engine: Callable[[Transformer, EngineConfig], Any]) -> int:
    """The KV cache's bytes on a GPU for this model and configuration (the module's docstring)."""
    peak = step_peak(model, config, device, make_engine)
    free, total = torch.cuda.mem_get_info(device)
    return kv_bytes(total, free, peak, config.gpu_memory_utilization)
