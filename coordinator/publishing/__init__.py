"""Publishing a version: aggregation, the outer step, the publisher and the downlink."""
