"""Configuration: the immutable `Config` (model), the file reader (loader) and its views."""
