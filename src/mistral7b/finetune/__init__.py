"""Fine-tuning: LoRA or full instruction tuning on JSONL chats/text, resumable, data parallel with torchrun.

`data` (records -> masked, packed rows), `lora` (adapters in PEFT's format), `schedule` (rows and learning
rate per step), `checkpointing` (atomic, pickle-free, exact resume), `distributed` (DDP), `trainer` (the loop),
`export` (write a full model), `plot` (loss curve).
"""
