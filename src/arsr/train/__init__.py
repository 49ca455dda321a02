"""The training engine shared by every training stage (engine.py), and what it is made of:
checkpoint.py (model.pt and resumable checkpoints), dist.py, ema.py, optim.py, logging.py.

Import from the modules themselves: this package file imports nothing, so a stage that only
loads a model.pt (``arsr.train.checkpoint``) does not load the engine with it.
"""
