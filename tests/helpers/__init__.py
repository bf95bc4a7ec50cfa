"""Shared test helpers: crafted archives, indexed shard sets, /proc probes, the soak harness."""
