"""Checkpoints, in one place: the folder layout and ``latest`` (``layout``), safe reading and atomic writing of
checkpoint files with one error type (``files``), saving and resuming a DeepSpeed engine with the training
state's parts (``store``), and consolidating ZeRO shards into one fp32 state dict (``consolidate``).

Layout of a training stage's ``checkpoints/``::

    step_00000200/              DeepSpeed's files (model, optimizer partitions); the client state inside holds the
        rng_rank0.pt ...        training state's shared parts; every rank's generator states beside them
        meta.json               step, world size, ZeRO stage, identity: read before DeepSpeed loads anything
    latest                      the tag to resume from, replaced atomically by rank 0 once every rank has written
"""
