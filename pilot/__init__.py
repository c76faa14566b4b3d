"""Pilot: curtailment-aware federated pretraining of nanochat GPTs (Flower app, coordination, energy, sites)."""
