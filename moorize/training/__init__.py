"""Multi-task training of the MoORE parameters: ``loop`` is the recipe (set up, step, evaluate, save); beside it
``options``, ``data``, ``plan`` (the step plan), ``losses``, ``schedule``, ``parallel`` (accelerate, FSDP2),
``checkpoints``, ``metrics``, ``divergence`` and ``rundir``."""
