"""Applications: the command line, figures, Dask distribution."""
