"""Simulated GPUs: scenario files, the world model, and the virtual-time runner."""
