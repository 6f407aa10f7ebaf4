"""Where a batch-1 decode step's time goes on the GPU: a profiler trace of the engine, read back per kernel.

bench/gpu.py gives the rate and bench/gpu_ab.py what each switch is worth; this one says which kernels and
which gaps make up a step, to find the next thing to cut. It decodes with the same random Mistral-7B-shaped
model as gpu_ab.py under torch.profiler and prints, from the trace's GPU events:
- the step period and the time from the step's first kernel to the output projection (the 32 layers);
- for the kernels of one layer, in order: the average time from the previous kernel's end to this one's end
  (what each adds to the step; with programmatic dependent launch kernels start before the previous one ends);
- everything between the output projection's end and the next step's first layer kernel (memory copies,
  the graph's input kernels, the embedding lookup, the pick of the token), with idle gaps.
The profiler slows the host, so idle gaps the GPU shows here may not exist without it; kernel times hold.
So it then times, without the profiler, the batch-1 graph replayed back to back (no copies; the picks made in
the graph as shipped, DecodeTuning.zero_copy; with --copies, the path before: the argmax kernel after
each replay, timed too), and the engine's own steps: the differences are what the step's ends cost in a real run.

Usage (GPU): PYTHONPATH=src python bench/gpu_timeline.py [--steps 64] [--copies]   (about a minute on an H200)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from gpu_ab import random_model  # noqa: E402

from mistral7b.config import ModelArgs  # noqa: E402
from mistral7b.kernels.tuning import DecodeTuning  # noqa: E402
from mistral7b.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from mistral7b.engine.sampling_params import SamplingParams  # noqa: E402

LAYER_KERNELS = 6  # wqkv, attention, merge, wo, w13, w2 (model/one_token.py)


def gpu_events(engine: LLMEngine, ids: list[int], steps: int) -> list[dict]:
    """Kernel and memory-copy events (name, ts, dur in us, grid) of `steps` decode steps, sorted by start."""
    engine.add_request("warm", ids, SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True))
    for _ in range(8):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(events, key=lambda e: e["ts"])


def report(events: list[dict], n_layers: int) -> None:
    def grid(e: dict) -> int:
        return e.get("args", {}).get("grid", [0])[0]

    def end(e: dict) -> float:
        return e["ts"] + e["dur"]

    widest = max(grid(e) for e in events if "gemv" in e["name"])  # the output projection's: the most rows
    outputs = [i for i, e in enumerate(events) if "gemv" in e["name"] and grid(e) == widest]
    assert len(outputs) >= 3, "no output projections found in the trace"
    period = statistics.median(events[b]["ts"] - events[a]["ts"] for a, b in zip(outputs, outputs[1:]))
    print(f"steps traced: {len(outputs)}; step period (median) {period:.1f} us = {1e6 / period:.1f} tok/s")
    # The step after output projection j: its layer kernels are the last n_layers * LAYER_KERNELS before the
    # next output projection; what is in between belongs to the step boundary.
    per_kernel: list[list[float]] = [[] for _ in range(LAYER_KERNELS)]
    layers, boundary = [], []
    for a, b in zip(outputs, outputs[1:]):
        first = b - n_layers * LAYER_KERNELS
        if first <= a:
            continue
        layers.append(events[b]["ts"] - events[first]["ts"])
        for i in range(first + 1, b):
            per_kernel[(i - first) % LAYER_KERNELS].append(end(events[i]) - end(events[i - 1]))
        boundary.append(events[a : first + 1])
    print(f"first layer kernel -> output projection start (median): {statistics.median(layers):.1f} us, "
          f"{statistics.median(layers) / n_layers:.2f} us a layer")
    names = events[outputs[1] - n_layers * LAYER_KERNELS : outputs[1] - (n_layers - 1) * LAYER_KERNELS]
    print("\none layer, previous kernel's end -> this kernel's end (median over all layers and steps):")
    for k, e in enumerate(names):  # per_kernel[0]: wqkv from the end of the layer before's last kernel
        print(f"  {e['name'][:60]:60s} grid {grid(e):6d}  {statistics.median(per_kernel[k]):7.2f} us")
    out_adds = [end(events[b]) - end(events[b - 1]) for b in outputs[1:]]
    print(f"  {'output projection (+ final norm)':60s}             {statistics.median(out_adds):7.2f} us")
    print("\nstep boundary (one step; times from the output projection's start, us):")
    middle = boundary[len(boundary) // 2]
    t0 = middle[0]["ts"]
    for i, e in enumerate(middle):
        idle = e["ts"] - end(middle[i - 1]) if i else 0.0
        print(f"  start {e['ts'] - t0:8.1f}  dur {e['dur']:7.1f}  idle before {max(idle, 0.0):6.1f}  "
              f"{e['name'][:70]}")
    totals = [s[-1]["ts"] - end(s[0]) for s in boundary]
    print(f"output projection end -> next step's first layer kernel start (median): {statistics.median(totals):.1f} us")


def step_ends(engine: LLMEngine, ids: list[int], steps: int) -> None:
    """Period of a batch-1 step without the profiler: the graph alone (+ the argmax kernel after it on the path
    with copies), and the engine's own step."""
    from mistral7b.engine.sampler import _greedy

    engine.add_request("ends", ids, SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True))
    for _ in range(8):  # pre-fill and the first decode steps: the graph's inputs now hold a decode step's
        engine.step()
    graph, logits = engine.runner.graphs.graphs[1]

    def period(one_step) -> float:
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                one_step()
            stop.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(stop) * 1e3 / steps)
        return best

    lines = [("graph replays back to back", period(graph.replay))]
    if not engine.runner.graphs.zero_copy:
        lines.append(("... + the argmax kernel", period(lambda: (graph.replay(), _greedy(logits)))))
    torch.cuda.synchronize()
    engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    real = (time.perf_counter() - t0) * 1e6 / steps
    while engine.has_unfinished():
        engine.step()
    print("\nwithout the profiler, a batch-1 step (best of 3 x %d):" % steps)
    for label, us in (*lines, ("the engine's steps (with the host's work)", real)):
        print(f"  {label:45s} {us:8.1f} us = {1e6 / us:6.1f} tok/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--copies", action="store_true", help="the step's ends before: inputs copied in, picks after")
    a = p.parse_args()
    args = ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                     norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0, sliding_window=4096)
    model = random_model(args, "cuda", torch.bfloat16)
    ids = torch.randint(0, args.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=1, max_model_len=1280, chunk_size=2048,
                                                 max_num_batched_tokens=8192, attention="triton",
                                                 tuning=DecodeTuning(zero_copy=not a.copies)))
    report(gpu_events(engine, ids, a.steps), args.n_layers)
    step_ends(engine, ids, 4 * a.steps)


if __name__ == "__main__":
    main()
