"""moonfast's CPU speed layer: compiled kernels (build), batch norm (norm), max pool (pool), up-convolution (upconv), and speed_up (speedups)."""
