"""edgesplit: split learning at the edge.

The package root imports nothing heavy: ``import edgesplit`` works on a device with no torch.
"""

__version__ = "0.1.0"
