"""The driver side of bulkscore: read inputs, plan shards, schedule them on Ray, gather results.

Nothing here imports torch or transformers; the model lives in the `workers` actors.
"""
