"""Sparse dictionaries (TopK SAEs, skip-transcoders): harvest, train, evaluate, files.

Features are sites (``L15.resid.post.F123``) that capture, edit and patch like any other.
"""
