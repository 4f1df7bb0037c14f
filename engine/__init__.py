"""Everything that is not a kernel and not a command line: tokenizer, data, model, training."""
