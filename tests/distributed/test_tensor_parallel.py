"""Tensor parallelism on CPU processes over gloo: logits of sharded ranks equal one process (float32), with
KV heads split (tp = 2 <= n_kv_heads) and replicated (tp = 4 > n_kv_heads), a vocabulary that does not split
evenly, native and Hugging Face files; the engine (`LLM(tensor_parallel_size=2)`, which starts its worker)
generates what one process generates; a real `mistral7b serve --tensor-parallel-size 2` answers the openai
client with the single-process tokens; bad sizes get one clear error.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mistral7b.config import ModelArgs
from mistral7b.model.tensor_parallel import Shard, check_shardable, slice_spec
from mistral7b.errors import RequestError
from mistral7b.loading import open_checkpoint
from mistral7b.loading.writers import save_hf, save_native
from mistral7b.model.build import build_model
from tests.loading.conftest import random_state
from tests.server.conftest import free_port

W = 8
ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=131, rope_theta=10000.0, sliding_window=W, max_seq_len=512)  # 131: uneven vocab
TOKENS = torch.tensor([[(7 * i + 3) % 131 for i in range(3 * W + 5)]])


def _rank_logits(rank: int, size: int, port: int, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        model = build_model(open_checkpoint(folder), torch.float32, "cpu", progress=False, shard=Shard(rank, size))
        with torch.no_grad():
            logits = model(TOKENS, torch.arange(TOKENS.shape[1])[None])
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    state = random_state(ARGS, seed=3)
    native = str(tmp_path_factory.mktemp("tp_native"))
    hf = str(tmp_path_factory.mktemp("tp_hf"))
    save_native(native, ARGS, state)
    save_hf(hf, ARGS, state)
    return {"native": native, "hf": hf}


@pytest.mark.parametrize("fmt,size", [("native", 2), ("hf", 2), ("native", 4)])
def test_sharded_logits_equal_one_process(checkpoints, tmp_path, fmt, size):
    folder = checkpoints[fmt]
    with torch.no_grad():
        want = build_model(open_checkpoint(folder), torch.float32, "cpu", progress=False)(
            TOKENS, torch.arange(TOKENS.shape[1])[None])
    out = str(tmp_path / "logits.pt")
    mp.spawn(_rank_logits, args=(size, free_port(), folder, out), nprocs=size, join=True)
    got = torch.load(out)
    assert got.shape == want.shape == (1, TOKENS.shape[1], ARGS.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_slices_cover_each_matrix_once():
    """Column-parallel rows and row-parallel columns partition their matrix; replicated KV heads repeat."""
    for name, full in (("layers.0.attention.wq.weight", ARGS.n_heads * ARGS.head_dim),
                       ("layers.0.feed_forward.w1.weight", ARGS.hidden_dim),
                       ("layers.1.feed_forward.w2.weight", ARGS.hidden_dim),
                       ("output.weight", ARGS.vocab_size)):
        spans = [slice_spec(name, ARGS, Shard(r, 2))[1:] for r in range(2)]
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == full, name
    kv = [slice_spec("layers.0.attention.wk.weight", ARGS, Shard(r, 4)) for r in range(4)]
    assert [s[1] // ARGS.head_dim for s in kv] == [0, 0, 1, 1]
    assert slice_spec("layers.0.attention_norm.weight", ARGS, Shard(1, 2)) is None


def test_unshardable_sizes_are_clear_errors():
    for size, words in ((3, "4 attention heads"), (0, "positive integer")):
        with pytest.raises(RequestError, match=words):
            check_shardable(ARGS, size)
    with pytest.raises(RequestError, match="KV heads"):
        check_shardable(dataclasses.replace(ARGS, n_heads=6, n_kv_heads=3, hidden_dim=96), 2)


def test_engine_with_two_ranks_generates_what_one_process_generates(checkpoints):
    from mistral7b import LLM, SamplingParams

    prompts = [[(5 * i + 1) % 131 for i in range(n)] for n in (3, W, 3 * W + 2, 5 * W)]
    params = SamplingParams(max_tokens=2 * W + 3, temperature=0, logprobs=True)
    one = LLM(checkpoints["native"], progress=False, chunk_size=W - 1, max_model_len=256)
    want = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in one.generate(prompts, params)]
    two = LLM(checkpoints["native"], progress=False, chunk_size=W - 1, max_model_len=256, tensor_parallel_size=2,
              threads=1)
    try:
        assert two.engine.cache.n_kv_heads == 1 and two.model.layers[0].attention.n_heads == 2
        got = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in two.generate(prompts, params)]
        scored = two.score(prompts[:2])  # scoring is an engine request: sharded too
        for a, b in zip(one.score(prompts[:2]), scored):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    finally:
        two.close()
    for (t1, lp1), (t2, lp2) in zip(want, got):
        assert t1 == t2
        assert max(abs(a - b) for a, b in zip(lp1, lp2)) < 1e-4


def test_server_with_two_ranks_answers_like_one_process(tmp_path):
    from mistral7b import LLM, SamplingParams
    from tests.conftest import write_tiny_mistral
    from tests.server.conftest import API_KEY, start_server

    args = dataclasses.replace(ARGS, vocab_size=32000, sliding_window=16)
    folder = write_tiny_mistral(str(tmp_path / "model"), args, seed=7)
    messages = [{"role": "user", "content": "Tell me about sliding windows and rolling buffers."}]
    offline = LLM(folder, progress=False, max_model_len=512)
    want = offline.chat([messages], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    server = start_server(folder, str(tmp_path), "--api-key", API_KEY, "--tensor-parallel-size", "2",
                          "--served-model-name", "m",
                          "--chunk-size", "24", "--max-model-len", "512", "--threads", "1")
    try:
        client = server.client()
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == want
        stream = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    finally:
        assert server.stop() == 0
    log = open(server.log).read()
    assert "Traceback" not in log, log


def test_generate_under_torchrun_equals_one_process(checkpoints, tmp_path):
    """`torchrun --nproc-per-node 2 -m mistral7b generate --tensor-parallel-size 2`: rank 0 prints what one
    process prints; rank 1 serves its steps and exits cleanly."""
    import json
    import subprocess
    import sys

    common = ["generate", "--model", checkpoints["native"], "--prompt-ids", ",".join(str(t) for t in range(1, 30)),
              "--max-tokens", "12", "--json", "--quiet", "--chunk-size", "5", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mistral7b", *common], capture_output=True, text=True, env=env,
                         timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mistral7b", *common, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert two.returncode == 0, two.stderr
    want = json.loads(one.stdout)
    got = json.loads(two.stdout)  # rank 1 prints nothing
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 12
    assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 1e-4
    mismatch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), "-m", "mistral7b", *common,
                               "--tensor-parallel-size", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert mismatch.returncode != 0 and "error: --tensor-parallel-size 4 but torchrun started 2" in mismatch.stderr
    ours = [line for line in mismatch.stderr.splitlines()  # torchrun prints its own traceback, not ours
            if line.lstrip().startswith("File ") and f"{os.sep}mistral7b{os.sep}" in line]
    assert not ours, mismatch.stderr


def test_a_dead_worker_is_one_clear_error_and_never_a_hang(checkpoints):
    import signal

    from mistral7b import LLM, SamplingParams
    from mistral7b.errors import WorkerError

    llm = LLM(checkpoints["native"], progress=False, max_model_len=128, tensor_parallel_size=2, threads=1)
    params = SamplingParams(max_tokens=3, temperature=0)
    assert len(llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids) == 3
    child = llm._group.children[0]
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    with pytest.raises(WorkerError, match="worker stopped"):
        llm.generate([[1, 2, 3]], params)
    llm.close()  # returns, and leaves the group: the next test can start another
    assert not dist.is_initialized()


def test_a_worker_that_dies_while_starting_is_one_clear_error(checkpoints):
    from mistral7b.distributed.launch import WorkerSpec, start_group
    from mistral7b.errors import WorkerError

    spec = WorkerSpec(checkpoints["native"], "keep", torch.float32, "cpu", threads=-1)  # fails in the child
    with pytest.raises(WorkerError, match="exited with code 1 while starting"):
        start_group(2, spec)
    assert not dist.is_initialized()
