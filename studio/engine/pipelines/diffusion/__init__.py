"""Diffusion pipelines: one skeleton (skeleton.py) and a small module per family (sd.py, wan.py).

A new diffusion family is its model file(s) in studio/models, its catalog entry in studio/families,
one module here that supplies its parts and steps to the skeleton, and its tests.
"""
