"""The run's data: the corpus cut into sequences, and the tokenizer."""
