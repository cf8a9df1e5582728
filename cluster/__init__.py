"""How a stage's processes are started: in this process, as local processes, or on a cluster."""
