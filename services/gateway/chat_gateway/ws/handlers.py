"""The /ws protocol endpoint (being built: issue 3)."""
websocket_routes: list = []
