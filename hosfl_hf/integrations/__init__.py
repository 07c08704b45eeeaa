"""Drivers of the round protocol on other runtimes (Flower)."""
