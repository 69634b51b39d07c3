"""The daemon's life cycle: boot image selection, loading, self-test, hot swap, draining, systemd."""
