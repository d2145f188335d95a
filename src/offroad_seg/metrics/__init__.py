"""Scores: segmentation metrics from one confusion matrix per split (`confusion`), and the
hackathon's starter evaluation reproduced exactly, for comparison with published numbers only
(`hackathon`).

Layer: above `models`; pure functions of predictions and labels.
"""
