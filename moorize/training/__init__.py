"""Multi-task training of the MoORE parameters: options, data, losses, checkpoints, metrics, the loop."""
