"""Server-side tools: what Relay runs inside a response for any model (remote MCP servers,
web search), behind one small interface the engine's tool loop drives
(`relay.engine.tool_loop`): list a server's tools, call one with a deadline and cancel."""
