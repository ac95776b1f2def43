"""What every step stands on: the content-addressed store (store.py), device and thread placement
(device.py) and the one error a user is shown as a single line (errors.py)."""
