"""Serving one or more models with several engine replicas on Ray: routing (router.py,
radix.py), the replicas and their pool with failover (replica.py, handle.py, pool.py),
autoscaling (autoscale.py), and the command-line options (options.py)."""
