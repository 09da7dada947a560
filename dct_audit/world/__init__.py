"""The planted-bias world: procedural scenes, their ground truth, and the small models trained on them."""
