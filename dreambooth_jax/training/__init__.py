"""DreamBooth training: prior-preserving loss, sharded train step, checkpoints, export."""
