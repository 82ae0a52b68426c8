"""Measuring honestly: timers and phases of a pipeline call, memory meters, the environment, the
statistics of paired timings and the protocol that schedules and summarises them."""
