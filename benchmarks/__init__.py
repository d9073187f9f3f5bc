"""Measurements that back gradpool's performance claims; each module runs as ``python -m benchmarks.NAME``."""
