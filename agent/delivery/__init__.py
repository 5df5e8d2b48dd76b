"""Delivery: the Seyaha client, the pure retry and classification rules, and the worker loop."""
