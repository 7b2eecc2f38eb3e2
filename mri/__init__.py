"""The lower layer, below models/: the data (mri.data), the synthetic cohort (mri.synthetic), subject-level
statistics (mri.stats) and the training plumbing every trainer shares (mri.training). Nothing here imports
models/, evaluation/ or simulation/."""
