"""Integrations of dpcompile with training frameworks, each imported on its own (its framework is an
optional dependency):

- `dpcompile.integrations.transformers`: `DPTrainer`, a Hugging Face `transformers.Trainer` that
  trains privately (Poisson batches, σ from a target ε, ε in the logs, privacy state in checkpoints).
"""
