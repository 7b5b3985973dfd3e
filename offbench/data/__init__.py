"""Datasets: sources (D4RL HDF5, Minari), the catalog, the shared DataModule, synthetic data."""
