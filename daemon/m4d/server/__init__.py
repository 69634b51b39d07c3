"""Transport: the gRPC servers and their relays, caller identity, the servicers, protobuf ⇄
domain (`convert`), errors → status (`status`) and the metrics endpoint."""
