"""Work on a live model: loading, calibration data, block-input capture and the layer-by-layer driver."""
