"""Objectives of the self-supervised and contrastive modes, each a small module of plain tensor code."""
