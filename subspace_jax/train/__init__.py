"""What a train step is: the optimizer, the train state, the sharded
train/eval steps, and the checkpoints that hold the state."""
