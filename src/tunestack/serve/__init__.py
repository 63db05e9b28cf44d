"""`tunestack serve`: the OpenAI-compatible API, its decoding engines and the web chat page."""
