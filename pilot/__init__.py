"""Pilot: curtailment-aware federated pretraining of nanochat GPTs. One folder per role:

    server_app.py   Flower ServerApp shell: reads the run settings, runs the server's loop
    client_app.py   Flower ClientApp shell: names its site, relays a round to the site's trainer
    cli.py          `pilot`: the front door (config, env, redis, plan, certs; demo, watch, report, provision)
    protocol.py     the envelope: Flower message keys, site naming, Redis keys, round request and result
    settings.py     run settings: one table (the README reference) read as typed groups
    coordination.py Redis: the one URL resolution, checked clients, the embedded redis-server, key names
    server/         the round engine by role: roster, clock, policy, training side, checkpoints, ledger, loop
    site/           the site trainer: training across rounds, its watchers, its process life
    dataplane/      weights as content-addressed blobs over HTTP(S), and update payloads
    energy/         when each site is curtailed (Vessim, MOER traces, policy), published to Redis
    provision/      elastic sites: compute up and down with the windows (local, Kubernetes)
    report/         `pilot report`: a run's page, figures and summary from its logs
    ops/            operators' tools: demo, live view, certificates, processes of a local run
"""
