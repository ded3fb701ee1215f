"""Executable explanations (rules) for neurons, features and heads, scored on held-out text
against nulls; a unit whose best rule does not beat its null is "unlabelled".
"""
