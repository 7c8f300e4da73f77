"""Training machinery shared by the training verbs: the self-training step and its loss terms."""
