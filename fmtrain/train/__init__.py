"""Training-loop helpers: LR schedules, FLOP/memory arithmetic and metrics logging."""
