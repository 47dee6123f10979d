"""What is on disk and how it is written: atomic writes and safe loads (files.py), the adapter folder's format
(adapter.py), and getting a base model as a LitGPT checkpoint (hub.py).
"""
