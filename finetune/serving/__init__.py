"""Serving a trained run: reopening it (reopen.py), the SignalProvider (inference.py); the entry points
(finetune.serve, predict, evaluate, merge, ab) are the top-level modules that use them."""
