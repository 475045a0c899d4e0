"""What operators see of Relay: metrics, traces, access logs."""

# prometheus_client's variable for its multiprocess mode (`relay serve --workers N`): named
# here, apart from relay.observe.metrics, so that the command line reads it without importing
# the library.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# gen_ai.provider.name by deployment kind (metrics and traces): OpenAI-compatible servers are
# "openai", as the GenAI conventions name what an OpenAI client calls.
PROVIDER_NAMES = {
    "openai_chat": "openai",
    "openai_responses": "openai",
    "anthropic": "anthropic",
    "llama_cpp": "llama_cpp",
    "fake": "relay.fake",
}
