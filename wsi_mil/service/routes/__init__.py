"""One router per resource; `create_app` mounts them (the /v1 ones behind the API key)."""
