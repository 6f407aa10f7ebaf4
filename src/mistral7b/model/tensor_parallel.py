"""Tensor parallelism (Megatron-style): each rank holds a slice of every large matrix and of the KV cache.

Per block, the QKV and gate-up projections are split by output rows (column-parallel: rank r computes its
own heads and its share of the hidden units), and the output and down projections by input columns
(row-parallel: each rank's partial product is summed by one all-reduce). Query heads are split evenly;
KV heads too when tp divides n_kv_heads, otherwise (tp a multiple of n_kv_heads) each rank holds the one KV
head its query heads read, replicated tp / n_kv_heads times. The embedding and the output layer are split by
vocabulary rows: a lookup zeroes the ids outside the rank's range and all-reduces; the logits are gathered.

A rank's model is an ordinary `Transformer` built with the local sizes (`local_args`), with the three
communicating layers wrapped (`parallelize`), so the attention, the paged cache and the GPU kernels need no
change: they simply see fewer heads. `slice_spec` says which rows or columns of each checkpoint tensor a
rank needs, so loading reads only those (safetensors slices).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mistral7b.config import ModelArgs
from mistral7b.errors import RequestError


@dataclass(frozen=True)
class Shard:
    """This process's place: rank `rank` of `size`, in `group` (None = the default group)."""

    rank: int
    size: int
    group: object = None

    def kv_heads(self, args: ModelArgs) -> tuple[int, int]:
        """(first KV head, count) held by this rank."""
        if self.size <= args.n_kv_heads:
            per = args.n_kv_heads // self.size
            return self.rank * per, per
        return self.rank // (self.size // args.n_kv_heads), 1

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        per = -(-vocab // self.size)
        return min(self.rank * per, vocab), min((self.rank + 1) * per, vocab)


def check_shardable(args: ModelArgs, size: int) -> None:
    """RequestError unless the model splits evenly over `size` ranks."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RequestError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    problems = []
    if args.n_heads % size:
        problems.append(f"{args.n_heads} attention heads")
    if args.hidden_dim % size:
        problems.append(f"a hidden size of {args.hidden_dim}")
    if args.n_kv_heads % size and size % args.n_kv_heads:
        problems.append(f"{args.n_kv_heads} KV heads (tp must divide them or be a multiple of them)")
    if problems:
        raise RequestError(f"this model cannot be split over {size} ranks: " + ", ".join(problems)
                           + f"; valid sizes divide {args.n_heads} heads and {args.hidden_dim} hidden units")


def local_args(args: ModelArgs, shard: Shard) -> ModelArgs:
    """The sizes one rank's model is built with (vocab = the rank's padded share)."""
    _, kv = shard.kv_heads(args)
    return dataclasses.replace(args, n_heads=args.n_heads // shard.size, n_kv_heads=kv,
                               hidden_dim=args.hidden_dim // shard.size, vocab_size=-(-args.vocab_size // shard.size))


def slice_spec(name: str, args: ModelArgs, shard: Shard) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the checkpoint tensor `name` (native name) that this rank holds; None = all."""
    D = args.head_dim
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    if name in ("tok_embeddings.weight", "output.weight"):
        return (0, *shard.vocab_range(args.vocab_size))
    if leaf == "wq":
        per = args.n_heads // shard.size
        return 0, shard.rank * per * D, (shard.rank + 1) * per * D
    if leaf in ("wk", "wv"):
        first, count = shard.kv_heads(args)
        return 0, first * D, (first + count) * D
    if leaf == "wo":
        per = args.n_heads // shard.size
        return 1, shard.rank * per * D, (shard.rank + 1) * per * D
    per = args.hidden_dim // shard.size
    if leaf in ("w1", "w3"):
        return 0, shard.rank * per, (shard.rank + 1) * per
    if leaf == "w2":
        return 1, shard.rank * per, (shard.rank + 1) * per
    return None


def take_slice(tensor: torch.Tensor, spec: tuple[int, int, int] | None, rows: int | None = None) -> torch.Tensor:
    """The slice of a full tensor; vocabulary slices are zero-padded to `rows` (the last rank's may be short)."""
    part = tensor
    if spec is not None:
        dim, start, stop = spec
        part = tensor.narrow(dim, start, stop - start)
    if rows is not None and part.shape[0] < rows:
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
    return part.contiguous()


class RowParallel(nn.Module):
    """A linear layer over this rank's input columns; the partial products of all ranks are summed."""

    def __init__(self, inner: nn.Module, shard: Shard):
        super().__init__()
        self.inner, self.shard = inner, shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=self.shard.group)
        return y


class VocabParallelEmbedding(nn.Module):
    """Lookup in this rank's rows of the table; rows of other ranks come from them through an all-reduce."""

    def __init__(self, inner: nn.Embedding, start: int, shard: Shard):
        super().__init__()
        self.inner, self.start, self.shard = inner, start, shard

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.inner.weight.shape[0])
        out = F.embedding(local.clamp(0, self.inner.weight.shape[0] - 1), self.inner.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.shard.group)
        return out


class GatheredOutput(nn.Module):
    """The output layer over this rank's vocabulary rows; every rank gets the whole logits (all-gather)."""

    def __init__(self, inner: nn.Module, vocab: int, shard: Shard):
        super().__init__()
        self.inner, self.vocab, self.shard = inner, vocab, shard

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.inner(h).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.shard.size)]
        dist.all_gather(parts, local, group=self.shard.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def parallelize(model: nn.Module, args: ModelArgs, shard: Shard) -> None:
    """Wrap the layers that communicate, in place (after the weights are loaded); `args` = the full sizes."""
    for layer in model.layers:
        layer.attention.wo = RowParallel(layer.attention.wo, shard)
        layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2, shard)
    start, _ = shard.vocab_range(args.vocab_size)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, start, shard)
    model.output = GatheredOutput(model.output, args.vocab_size, shard)
    model.global_args = args
