"""Developer tools: not part of the runtime package (the image does not ship them)."""
