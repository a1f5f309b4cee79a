"""Offline sample-quality evaluation: a locally trained feature classifier and Fréchet distance.

No Inception weights can be downloaded here, so the project trains its own small classifier
(cached on disk) and measures the Fréchet distance in its feature space.
"""
