"""adapters: the LoRA adapter store and its validation; training and evaluation with peft."""
