"""Generation: sampling parameters, the sampler, sequences, the scheduler, the model runner, the engine
(continuous batching over the paged KV cache) and the `LLM` API."""
