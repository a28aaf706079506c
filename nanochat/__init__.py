"""nanochat-compatible model stack: GPT, tokenizer, checkpoints, sampling engine, training pieces.

Importing the package imports nothing heavy; torch is pulled in by the modules that need it.
"""
