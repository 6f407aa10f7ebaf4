"""A/B of the GPU decode switches in one process: the same random Mistral-7B-shaped model, one engine per variant.

bench/gpu.py measures the engine as shipped; this one measures what each switch is worth on the same GPU in the
same minute (machines differ by a few percent in their ceilings, so comparisons across runs are weaker):
- batch 1 (512-token prompt, 256 greedy tokens, best of 3): programmatic dependent launch on / off
  (MISTRAL7B_PDL, kernels/pdl.py); the norm before w13 started in wo's GEMV and finished in w13's, or a kernel
  (DecodeTuning.ffn_norm_in_wo); wo's epilogue loads before or after its loop (DecodeTuning.early_epilogue);
  all norms folded into wqkv's and the output's GEMVs and w2's residual add into its GEMV, or apart
  (DecodeTuning.fold_norms); SwiGLU's product in w13's GEMV or in w2's
  (DecodeTuning.swiglu_epilogue); a split's first key block of earlier steps loaded before or after PDL's wait
  (DecodeTuning.kv_before_wait); greedy picks by our argmax kernel or PyTorch's (DecodeTuning.argmax_kernel);
  the decode graph reading its inputs from pinned memory and making the picks itself, or a copy in and the
  argmax and a copy out around it (DecodeTuning.zero_copy); up to 32 or 16 key splits
  (DecodeTuning.max_splits); RoPE + k/v store in wqkv's GEMV or in the separate rotary-store kernel
  (DecodeTuning.rope_in_gemv); and the kernels of two sessions ago (norms apart, SwiGLU in w2,
  16 splits, and the last two sessions' step-end changes off). Every variant is an engine built with its own
  DecodeTuning (kernels/tuning.py): nothing is patched. (The output projection's tile, swept before and after
  its norm was folded in, was an A/B of kernels/gemv.CONFIGS' table; its result is in bench/README.md.) The
  tokens of each variant are compared with the
  first's (PDL must not change one; the others may flip bf16 near-ties on random weights);
- 256 requests of 512 in / 256 out: the copies and picks around the graph (zero_copy off), also with
  PyTorch's argmax, and unsplit decode attention tiles with 2 warps rather than 1
  (DecodeTuning.decode_warps).
--focus runs only the newest switch (zero_copy), alternated with shipped.

Usage (GPU): PYTHONPATH=src python bench/gpu_ab.py   (about 3 minutes on an H200; no checkpoint is written)
CPU smoke test of the script: PYTHONPATH=src python bench/gpu_ab.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

if "--tiny" in sys.argv:  # before Triton is imported: kernels defined now run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from mistral7b.config import ModelArgs  # noqa: E402
from mistral7b.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from mistral7b.engine.sampling_params import SamplingParams  # noqa: E402
from mistral7b.kernels import gemv  # noqa: E402
from mistral7b.kernels.tuning import DecodeTuning  # noqa: E402
from mistral7b.model.fuse import fuse_projections  # noqa: E402
from mistral7b.model.transformer import Transformer  # noqa: E402

def configure(pdl: bool = True, splits: int = 32, warps: int = 1, **tuning: Any) -> dict:
    """A variant's engine options: its DecodeTuning (kernels/tuning.py; every switch but PDL, which is the
    environment variable MISTRAL7B_PDL that kernels/pdl.py reads)."""
    os.environ["MISTRAL7B_PDL"] = "1" if pdl else "0"
    return {"tuning": DecodeTuning(max_splits=splits, decode_warps=warps, **tuning)}


def random_model(args: ModelArgs, device: str, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02)
    return fuse_projections(model)


def decode(engine: LLMEngine, ids: list[int], n: int) -> tuple[float, list[int]]:
    engine.add_request("b1", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    times, tokens = [], []
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                times.append(time.perf_counter())
                tokens.append(e.token_id)
    return (len(times) - 1) / (times[-1] - times[0]), tokens


def throughput(engine: LLMEngine, requests: int, prompt: int, new: int, vocab: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)  # a new seed each run: no prefix-cache hits from the last one
    for i in range(requests):
        engine.add_request((seed, i), torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                           SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    t0, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += sum(1 for e in engine.step() if e.token_id is not None)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (Triton's interpreter)")
    p.add_argument("--focus", action="store_true",
                   help="only the newest switch, alternated with shipped, at batch 1 and at 256 requests; "
                        "the copies and picks around the graph (zero_copy off)")
    a = p.parse_args()
    if a.tiny:  # the interpreter runs the kernels; one-row float32 projections take the GEMV as on a GPU
        plain = gemv.takes_kernel
        gemv.takes_kernel = lambda m, x: type(m) is torch.nn.Linear and x.numel() == x.shape[-1] or plain(m, x)
        args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                         vocab_size=256, rope_theta=10000.0, sliding_window=32)
        device, dtype, prompt, new, requests, reps = "cpu", torch.float32, 24, 8, 4, 1
    else:
        args = ModelArgs(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                         norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0, sliding_window=4096)
        device, dtype, prompt, new, requests, reps = "cuda", torch.bfloat16, 512, 256, 256, 3
    model = random_model(args, device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (prompt,), generator=g).tolist()
    warm = torch.randint(0, args.vocab_size, (prompt,), generator=g).tolist()
    options = dict(max_model_len=2 * prompt + new, chunk_size=2048, max_num_batched_tokens=8192,
                   attention="triton")

    first = None
    kv_after = ("split keys/values loaded after PDL's wait", dict(kv_before_wait=False))
    previous = dict(fold_norms=False, swiglu_epilogue=False, splits=16, kv_before_wait=False, argmax_kernel=False,
                    zero_copy=False)
    copied = ("inputs copied in, picks made after the graph", dict(zero_copy=False))
    newest = [copied, ("shipped", {}), copied]
    variants = [("shipped", {}), *newest, ("shipped", {})] if a.focus else [
                      ("shipped", {}), ("no PDL", dict(pdl=False)), kv_after, *newest,
                      ("wo's epilogue loads after its loop", dict(early_epilogue=False)),
                      ("the norm before w13 a kernel", dict(ffn_norm_in_wo=False)),
                      ("all norms apart", dict(fold_norms=False)),
                      ("SwiGLU's product in w2's GEMV", dict(swiglu_epilogue=False)),
                      ("16 key splits", dict(splits=16)),
                      ("the kernels of two sessions ago", previous),
                      ("... and a separate rotary-store kernel", dict(previous, rope_in_gemv=False))]
    for label, kw in variants:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=1, **options, **configure(**kw)))
        decode(engine, warm, 32)
        runs = [decode(engine, ids, new) for _ in range(reps)]
        tokens = runs[-1][1]
        first = first or tokens
        same = next((i for i, (x, y) in enumerate(zip(tokens, first)) if x != y), len(tokens))
        print(f"batch 1, {label:46s} {max(r for r, _ in runs):7.1f} tok/s "
              f"(runs {', '.join(f'{r:.1f}' for r, _ in runs)}); tokens equal to the first variant's: "
              f"{same}/{len(tokens)}", flush=True)
        del engine
        gc.collect()

    wide = [("shipped", {}), copied] * (2 if a.focus else 1)
    if not a.focus:
        wide += [("... and PyTorch's argmax", dict(argmax_kernel=False, zero_copy=False)),
                 ("2 warps a decode tile", dict(warps=2))]
    for label, kw in wide:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=requests, **options, **configure(**kw)))
        throughput(engine, requests, prompt, 8, args.vocab_size, seed=1)
        rates = [throughput(engine, requests, prompt, new, args.vocab_size, seed=s) for s in (2, 3)]
        print(f"{requests} requests, {label:46s} {max(rates):9,.0f} output tok/s "
              f"(runs {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
        del engine
        gc.collect()
    os.environ.pop("MISTRAL7B_PDL", None)


if __name__ == "__main__":
    main()
