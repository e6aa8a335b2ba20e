"""Process groups and the collectives of tensor and pipeline parallelism (torch.distributed).

Used by the executor (starting ranks), the worker (pipeline send/recv) and the model
(all-reduce, all-gather); it imports none of them.
"""
