"""The base model: loading a LitGPT checkpoint and installing a method (load.py), and the architecture edits CQIL
(concurrent layer groups) and Low-Rank Clone (a narrower student).
"""
