"""Generated gRPC stubs for MobileFM (see protos/generate.py)."""
