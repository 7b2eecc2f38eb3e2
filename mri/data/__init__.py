"""The data: volumes read and cut into slabs, rigid registration of visits, the HDF5 slice store with its
attribute schema, and loaders that batch it (data_prep.py's pipeline)."""
