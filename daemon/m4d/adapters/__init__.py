"""M4's task adapters: LoRA and heads over the shared modules, their data, training and packaging."""
