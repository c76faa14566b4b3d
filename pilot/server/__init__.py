"""The server's round engine, by role (the loop sequences them; each part gets the event sink passed in).

    loop.py         the federation's loop: open the run, regimes, a round's dispatch and collection, the end
    roster.py       which Flower node serves which site (discovery that never blocks, failures by node)
    clock.py        the energy clock as the server reads it: curtailed sites, simulated time, news
    policy.py       pure: regime, every reason a round or the run ends
    training.py     the training side: model plan, global model, aggregation, evaluation, final model
    aggregation.py  pure: update checks, token-weighted averaging, the outer optimizer
    checkpoint.py   the global state on disk (atomic, LATEST with fallback), the base of every resume
    ledger.py       which shard each site trains, and how far every rank got (Redis)
    runlog.py       the run's record on disk and the server's event sink
"""
