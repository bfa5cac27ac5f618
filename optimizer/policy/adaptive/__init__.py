"""The adaptive strategy: a controller that sizes batches from memory models learned from reports."""
