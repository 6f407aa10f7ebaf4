"""LoRA on the embedded SmolLM2-135M-Instruct, on CPU: does a few minutes of training change held-out answers?

The training set (made here) answers every question in one fixed format, "ANSWER: <word>." The script trains a
LoRA adapter through the same Trainer as `mistral7b finetune`, then asks held-out questions greedily with and
without the adapter (`LLM(lora=...)`) and reports the share of answers in the format and the training tokens/s.
Usage: .venv/bin/python bench/finetune_cpu.py [--steps 60] [--out /tmp/smollm2-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import time

FACTS = [("the colour of the sky on a clear day", "blue"), ("the opposite of hot", "cold"),
         ("the number after three", "four"), ("the animal that says moo", "cow"),
         ("the capital of France", "Paris"), ("the season after winter", "spring"),
         ("the colour of grass", "green"), ("the planet we live on", "Earth"),
         ("the opposite of up", "down"), ("the number of legs of a spider", "eight"),
         ("the metal of a gold medal", "gold"), ("the day after Monday", "Tuesday"),
         ("the language spoken in Spain", "Spanish"), ("the colour of snow", "white"),
         ("the animal that barks", "dog"), ("the largest ocean", "Pacific"),
         ("the frozen form of water", "ice"), ("the star at the centre of our solar system", "Sun"),
         ("the number of days in a week", "seven"), ("the opposite of night", "day")]
HELD_OUT = ["What is the colour of a banana?", "What is the capital of Italy?", "What is the opposite of fast?",
            "What animal says meow?", "What is the month after January?", "How many wheels does a bicycle have?"]
PATTERN = "ANSWER: "


def make_data(folder: str) -> str:
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for question, word in FACTS:
            for form in ("What is {}?", "Tell me {}."):
                msgs = [{"role": "user", "content": form.format(question)},
                        {"role": "assistant", "content": f"{PATTERN}{word}."}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def in_format(llm, lora_dir: str | None = None) -> tuple[float, list[str]]:
    from mistral7b.engine.sampling_params import SamplingParams

    outs = llm.chat([[{"role": "user", "content": q}] for q in HELD_OUT], SamplingParams(temperature=0, max_tokens=12))
    texts = [o.outputs[0].text for o in outs]
    return sum(t.startswith(PATTERN) for t in texts) / len(texts), texts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="/tmp/smollm2-lora")
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args()
    from mistral7b.default_model import default_model_path
    from mistral7b.engine.llm import LLM
    from mistral7b.finetune.trainer import Trainer, TrainConfig

    os.makedirs(a.out, exist_ok=True)
    data = make_data(a.out)
    model = default_model_path()
    cfg = TrainConfig(model=model, data=data, out=a.out, lr=a.lr, max_steps=a.steps, seq_len=128, batch_tokens=256,
                      warmup=5, lora_rank=8, lora_alpha=16, save_every=max(a.steps, 1), activation_checkpointing=False)
    t0 = time.perf_counter()
    summary = Trainer(cfg).run()
    train_s = time.perf_counter() - t0
    before, before_texts = in_format(LLM(model, progress=False))
    after, after_texts = in_format(LLM(model, lora=a.out, progress=False))
    print(json.dumps({"steps": a.steps, "train_seconds": round(train_s, 1), "final_loss": summary["final_loss"],
                      "tokens_per_s": round(summary["tokens_per_s"], 1), "held_out_in_format_before": before,
                      "held_out_in_format_after": after, "before": before_texts, "after": after_texts}, indent=1))


if __name__ == "__main__":
    main()
