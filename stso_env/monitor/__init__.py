"""Monitoring: activation/attention summaries, event metrics (spikes, divergence, recovery)."""
