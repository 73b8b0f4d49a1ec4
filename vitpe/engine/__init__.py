"""Training machinery shared by every task: checkpoints, distributed helpers, optimizer and
schedules, metrics logging; and the per-task loops (``classification``, ...)."""
