"""POST /upload and GET /uploads/{fileName} (being built: issue 5)."""
upload_routes: list = []
