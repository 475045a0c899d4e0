"""What operators see of Relay: metrics, traces, access logs."""
