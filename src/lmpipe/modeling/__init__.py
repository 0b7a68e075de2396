"""The model layer: loading and saving models, the fine-tuning strategies, the one training loop, the text
datasets and the one inference loop. It names no task: a task gives its head and its datasets."""
