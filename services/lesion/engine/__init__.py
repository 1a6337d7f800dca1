"""Lesion detection engine: the working grid, the network pass, instances and overlays."""
