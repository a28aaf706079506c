"""Command-line scripts: tokenizer training, base-model pretraining and the demo builder (`python -m scripts.X`)."""
