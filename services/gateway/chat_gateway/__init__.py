"""The gateway: the only service users reach. Speaks the Chat-UI protocol over WebSocket,
serves uploads and downloads, and is the only caller of the AI service."""
