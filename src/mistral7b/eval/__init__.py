"""Evaluation: the paper's benchmarks through lm-evaluation-harness, and perplexity.

`loglik.py` scores (context, continuation) token ids with each context pre-filled once; `lm_eval_model.py`
is the lm-eval model `mistral7b` built on it; `perplexity.py` scores a text file in rolling windows;
`suite.py` holds the paper's task list, settings and reported numbers. lm-eval is an optional dependency
(`pip install mistral7b[eval]`), imported only by the modules that need it.
"""
