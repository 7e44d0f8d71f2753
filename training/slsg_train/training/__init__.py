"""Training: configuration, batches with simulated anomalies, generative pre-training, the SLSG loop."""
