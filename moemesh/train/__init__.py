"""`moemesh train-demo`: train the built-in model (a small DeepSeek-V3) on the Python standard library."""
