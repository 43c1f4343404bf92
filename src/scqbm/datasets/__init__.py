"""Real-data loaders (with checksums) and the simulator."""
