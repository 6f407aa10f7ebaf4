"""`python -m mistral7b.eval ARGS`: lm-eval's own command line, with the model `mistral7b` registered.

lm-eval 0.4.x finds models only in its built-in table or among classes already imported, with no
entry-point hook, so this imports our model class first and then hands ARGS to lm-eval unchanged:
    python -m mistral7b.eval --model mistral7b --model_args model=PATH,dtype=bfloat16 --tasks hellaswag
"""

from __future__ import annotations

import sys

from mistral7b.eval.harness import run_lm_eval_cli

if __name__ == "__main__":
    sys.exit(run_lm_eval_cli(sys.argv[1:]))
