"""What operators see of Relay: metrics, traces, access logs."""

# prometheus_client's variable for its multiprocess mode (`relay serve --workers N`): named
# here, apart from relay.observe.metrics, so that the command line reads it without importing
# the library.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
