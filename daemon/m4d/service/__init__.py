"""The daemon's life cycle, below any transport: boot image selection, loading, the served
image's task table and self-test, hot swap, draining, systemd."""
