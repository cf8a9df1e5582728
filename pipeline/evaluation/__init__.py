"""Evaluation protocols on frozen or fine-tuned models: top-1/top-5, k-NN, linear probes, zero-shot, KoPE analysis.

Every protocol works on plain tensors (features, logits, labels), so the metric code is tested on hand-made
inputs; :mod:`pipeline.evaluation.runner` connects them to exported models and sharded datasets.
"""
