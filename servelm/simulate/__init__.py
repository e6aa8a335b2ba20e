"""A discrete-event simulator of servelm clusters that runs the real scheduler, KV cache
manager, queue policies and router, with a fitted step-time model in place of the forward
pass (step_model.py); `servelm simulate profile` fits that model on the real engine and
`servelm simulate run` replays a `bench serve` workload against simulated replicas."""
