"""imgmig: move CRIU checkpoint images between nodes in memory, no shared storage."""

__version__ = "0.1.0"
