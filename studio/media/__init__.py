"""Torch-free media files the window and the engine share: video reading, writing and tags."""
