"""SLSG training side: data, anomaly simulation, the network, training, evaluation and export (torch)."""
