"""Reading exposures, checking inputs, and writing WCS corrections safely."""
