"""Recovery after pruning: LoRA adapters that keep the pruned zeros (lora) and the finetuning run (finetune)."""
