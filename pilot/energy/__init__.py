"""Energy: when is each site curtailed, published so that no consumer misses a change, and what it cost.

    sites.py       the scenario file: sites (name, region, signal, GPUs and their power) and the clock
    traces.py      MOER trace files (WattTime's wide and long CSV), validated row by row
    watttime.py    the official `watttime` client: historical download to a cached file, live polling
    policy.py      pure functions: threshold, step-function windows, hysteresis, overlap
    plan.py        `pilot plan`: replay a trace without Redis
    scenario.py    Vessim microgrids per site: PV (pvlib) and wind (windpowerlib) from TMY weather vs. load
    simulation.py  the co-simulation run: paced Vessim steps, published to Redis, resumable
    publisher.py   the writing side of the Redis schema (one transaction per step)
    events.py      the Redis schema and the consumer API (clock, site states, transition stream)
    accounting.py  energy (kWh) and emissions (kg CO2) of a schedule, and single-site baselines
"""
