"""On-disk artifacts: atomic files, stage manifests, checkpoints, the HDF5 prediction store."""
