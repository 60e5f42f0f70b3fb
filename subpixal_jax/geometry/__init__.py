"""Geometry between chips and the reference grid: homographies and pixel maps."""
