"""Image building (runs on the build host or the device): checkpoints -> firmware-image components."""
