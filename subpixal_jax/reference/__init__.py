"""The drizzled reference, source catalogs and catalog matching."""
