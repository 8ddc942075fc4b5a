"""Evaluating split configurations: sweeps over cuts x codecs, the Pareto frontier of accuracy vs
bytes, a latency model per device x link, recommendations, the SplitNN vs FedAvg resource
comparison, and reports with plots.

Submodules import what they need; importing this package imports nothing heavy.
"""
