"""Sans-IO protocols: bytes in, events out; no sockets."""
