"""The two daemons (proxy, cache) and the accept loop they share."""
