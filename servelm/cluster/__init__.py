"""Serving with several engine replicas: routing policies (router.py) today; replicas on
Ray, failover and autoscaling build on them (issue 18)."""
