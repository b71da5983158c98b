"""Image data: instance/class photos, TFDS sources."""
