"""Common package: attributes, HDF5 slice store, loader, preprocessing, synthetic cohort, grids."""
