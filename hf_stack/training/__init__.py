"""Stage 3, training: `StackingTrainer` continues pre-training and grows inside the run, with token, FLOP and
wall-clock accounting in every log entry."""
