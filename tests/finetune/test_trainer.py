"""The training loop: it learns (only from answers), resumes exactly after SIGKILL, and two gloo processes give
the update of one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from mistral7b.finetune.trainer import Trainer, TrainConfig
from tests.finetune.conftest import chat, write_jsonl

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "mistral7b", "finetune", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV,
                            start_new_session=True)  # its own process group: a hang kills the workers too
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out: {err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _small(model: str, data: str, out: str) -> list[str]:
    return ["--model", model, "--data", data, "--out", out, "--lr", "1e-2", "--max-steps", "8", "--seq-len", "32",
            "--batch-tokens", "64", "--warmup", "2", "--save-every", "3", "--quiet"]


def test_tiny_windowed_model_overfits_a_chat_set(tiny_mistral, chats, tmp_path):
    cfg = TrainConfig(model=tiny_mistral, data=chats, eval_data=chats, out=str(tmp_path / "run"), full=True,
                      lr=1e-2, max_steps=40, seq_len=64, batch_tokens=128, warmup=3, eval_every=20, save_every=20,
                      activation_checkpointing=False, progress=False)
    summary = Trainer(cfg).run()
    history = json.load(open(tmp_path / "run" / "history.json"))
    first, last = history[0]["loss"], summary["final_loss"]
    assert last < 0.1 * first, (first, last)
    assert summary["eval_loss"] < 0.1 * first
    assert os.path.getsize(tmp_path / "run" / "loss_curve.png") > 1000
    # The written model loads in our engine and now answers in the pattern the chats taught it.
    from mistral7b.engine.llm import LLM
    from mistral7b.engine.sampling_params import SamplingParams

    llm = LLM(str(tmp_path / "run"), progress=False)
    out = llm.chat(chat("Carol")["messages"][:2], SamplingParams(temperature=0, max_tokens=12))
    assert out.outputs[0].text.endswith(" is a friend of mine from school."), out.outputs[0].text


def test_sigkill_and_resume_ends_at_the_uninterrupted_loss(tiny_mistral, chats, tmp_path):
    killed = _cli(*_small(tiny_mistral, chats, str(tmp_path / "k")),
                  env={**ENV, "MISTRAL7B_FINETUNE_SIGKILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr
    assert json.load(open(tmp_path / "k" / "checkpoints" / "latest.json"))["step"] == 3  # steps 4-5 are lost
    resumed = _cli(*_small(tiny_mistral, chats, str(tmp_path / "k")), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    straight = _cli(*_small(tiny_mistral, chats, str(tmp_path / "u")))  # same process setup (threads) as above
    assert straight.returncode == 0, straight.stderr
    assert abs(json.loads(resumed.stdout)["final_loss"] - json.loads(straight.stdout)["final_loss"]) < 1e-6
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("k", "u"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_two_gloo_processes_equal_one_with_the_same_global_batch(tiny_mistral, chats, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = _cli(*_small(tiny_mistral, chats, str(tmp_path / "ddp")), launcher=launcher)
    assert two.returncode == 0, two.stderr[-2000:]
    cfg = TrainConfig(model=tiny_mistral, data=chats, out=str(tmp_path / "one"), lr=1e-2, max_steps=8, seq_len=32,
                      batch_tokens=64, grad_accum=2, warmup=2, save_every=3, progress=False)
    Trainer(cfg).run()
    ddp_hist = json.load(open(tmp_path / "ddp" / "history.json"))
    one_hist = json.load(open(tmp_path / "one" / "history.json"))
    assert len(ddp_hist) == len(one_hist) == 8
    for x, y in zip(ddp_hist, one_hist):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * y["loss"]
    assert ddp_hist[-1]["loss"] < ddp_hist[0]["loss"]  # it trained
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ddp", "one"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_checkpoints_hold_no_pickle(tiny_mistral, chats, tmp_path):
    cfg = TrainConfig(model=tiny_mistral, data=chats, out=str(tmp_path / "r"), max_steps=2, seq_len=32,
                      batch_tokens=64, save_every=1, progress=False)
    Trainer(cfg).run()
    root = tmp_path / "r" / "checkpoints"
    kept = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    assert kept == ["step_000001", "step_000002"]
    for d in kept:
        assert sorted(os.listdir(root / d)) == ["state.json", "tensors.safetensors"]
        tensors = load_file(root / d / "tensors.safetensors")
        assert any(k.startswith("optim.") for k in tensors) and tensors["rng.cpu"].dtype == torch.uint8


def test_bad_data_and_options_are_one_line_errors(tiny_mistral, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("Alice"), "[1, 2]"])
    for extra, message in (([], "bad.jsonl: line 2: expected an object"),
                           (["--seq-len", "0"], "--seq-len must be a positive integer")):
        p = _cli("--model", tiny_mistral, "--data", bad, "--out", str(tmp_path / "o"), "--quiet", *extra)
        assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and message in p.stderr, p.stderr
    p = _cli("--model", tiny_mistral, "--data", bad, "--out", str(tmp_path / "o"), "--quiet", "--skip-bad",
             "--max-steps", "1", "--seq-len", "64", "--batch-tokens", "64")
    assert p.returncode == 0 and "skipped 1 bad record(s)" in p.stderr, p.stderr


def test_activation_checkpointing_only_where_memory_asks_for_it(monkeypatch):
    """Recomputing blocks in backward costs a forward: on by default only when a micro-batch's activations
    would take more than a quarter of the free memory."""
    from mistral7b.config import PRESETS, ModelArgs
    from mistral7b.finetune import trainer

    monkeypatch.setattr(trainer, "available_memory", lambda device: 24 << 30)
    cpu = torch.device("cpu")
    smol = ModelArgs(dim=576, n_layers=30, head_dim=64, hidden_dim=1536, n_heads=9, n_kv_heads=3, norm_eps=1e-5,
                     vocab_size=49152)
    assert not trainer.needs_checkpointing(smol, 806, torch.float32, False, cpu)  # 20 short chats: ~1.2 GB
    assert trainer.needs_checkpointing(smol, 4096 * 2, torch.float32, True, cpu)
    assert trainer.needs_checkpointing(PRESETS["mistral-7b-v0.1"], 4096, torch.bfloat16, False, cpu)


def test_a_short_run_warms_up_within_itself_and_says_it_is_short(tiny_mistral, chats, tmp_path, capsys):
    """A run of 3 steps with the default 10-step warm-up: no warm-up at all (a tenth of the run), so its steps
    train at the full rate, not at lr / 10; the log says the run is too short and how to lengthen it; the loss
    curve shows the steps as points."""
    cfg = TrainConfig(model=tiny_mistral, data=chats, out=str(tmp_path / "short"), lr=1e-3, max_steps=3,
                      seq_len=32, batch_tokens=64, activation_checkpointing=False, progress=False)
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.warmup == 0 and [h["lr"] for h in trainer.history][0] == 1e-3
    err = capsys.readouterr().err
    assert "only 3 optimizer steps" in err and "--epochs" in err and "--warmup 10 is longer" in err
    from PIL import Image

    from mistral7b.finetune.plot import save_loss_curve

    save_loss_curve(trainer.history[:1], str(tmp_path / "one.png"))  # one step: a line alone draws nothing
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "one.png").convert("RGB"))).int()
    blue = int(((pixels - torch.tensor([31, 119, 180])).abs() < 30).all(-1).sum())
    assert blue > 75  # matplotlib's first colour: the point and the legend's sample (58 pixels: no point)
    long = Trainer(TrainConfig(model=tiny_mistral, data=chats, out=str(tmp_path / "long"), max_steps=200,
                               seq_len=32, batch_tokens=64, progress=False))
    assert long.warmup == 10  # a long run keeps the warm-up asked for


def test_a_small_file_is_repeated_enough_to_train(tiny_mistral, chats, tmp_path):
    """--epochs left out: a file of one step an epoch runs 20 epochs (20 steps, not 1); given, it is kept."""
    cfg = TrainConfig(model=tiny_mistral, data=chats, out=str(tmp_path / "auto"), seq_len=32, batch_tokens=4096,
                      progress=False)
    auto = Trainer(cfg)
    assert auto.stream.steps_per_epoch == 1 and auto.epochs == 20 and auto.stream.total_steps == 20
    assert auto.warmup == 2  # a tenth of the run
    one = Trainer(TrainConfig(model=tiny_mistral, data=chats, out=str(tmp_path / "one"), seq_len=32,
                              batch_tokens=4096, epochs=1, progress=False))
    assert one.stream.total_steps == 1

