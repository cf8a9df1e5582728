"""Datasets as WebDataset shards: writing them (sharding stages), describing them (manifest), reading them.

Submodules are imported where they are used, so importing this package stays cheap for worker processes.
"""
