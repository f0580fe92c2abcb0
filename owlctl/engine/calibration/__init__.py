"""Calibration passes on a live model: capture each block's inputs (capture), drive the blocks one by one
(driver), and the two passes built on it: the dense profile pass (profile) and the prune pass (prune)."""
