"""nanochat: the GPT model family, its optimizers, data, tokenizer and evaluation."""
