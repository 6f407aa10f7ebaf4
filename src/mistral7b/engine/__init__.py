"""Generation: sampling parameters, the sampler, the batch generation loop and the `LLM` API."""
