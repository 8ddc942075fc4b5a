"""The wire: frame format (frame.py) and protocol messages (messages.py). numpy only."""
