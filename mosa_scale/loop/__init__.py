"""The training loop: model assembly, one readable train step, evaluation."""
