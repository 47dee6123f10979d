"""A run from a resolved config to an exported adapter: the recipe (train.py), the LightningModule (lit_module.py),
its callbacks, exact resume and preemption, the run folder's lock, FSDP and precision plugins, per-job memory.
"""
