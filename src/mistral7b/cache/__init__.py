"""KV caches. `RollingKVCache` is the paper's rolling buffer (slot = position mod W)."""

from mistral7b.cache.rolling import RollingKVCache

__all__ = ["RollingKVCache"]
