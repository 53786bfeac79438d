"""The decoding engine: sampling, selection, the value model and decoding prompt sets into rows.

Imports flow one way: stages -> engine -> basics (objectives, policy, prompts, weights,
metrics, config, artifacts, tracking, adapters, cards).
"""
