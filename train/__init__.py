"""Fine-tuning, evaluation and prediction entry points (`python -m train.finetune`, ...)."""
