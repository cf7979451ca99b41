"""Exact tokenizing: compute_score's inputs, built in the serving process's threads or in worker processes.

Nothing here loads weights or touches a device, so a worker process holds only a tokenizer.
"""
