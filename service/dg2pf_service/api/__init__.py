"""The HTTP layer: thin routes that validate and delegate."""
