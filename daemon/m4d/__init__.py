"""m4d: the resident daemon that serves the M4 model to every app on the device."""

__version__ = "0.1.0"
