"""Training: the plain run as a recipe of named steps (recipe.py), the trainer for each objective (trainers.py),
and what surrounds one run: the model, resume and preemption, guards, incremental runs, SFT -> preference stages
and walk-forward folds."""
