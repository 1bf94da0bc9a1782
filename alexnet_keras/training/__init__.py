"""The one training path (`train.train_and_evaluate`) with what it needs: per-epoch checkpoints,
multi-device data parallelism, and the speed benchmark that times the same path."""
