"""Running probes: context in, measurement out, deadlines, shared bursts, the prober registry."""
