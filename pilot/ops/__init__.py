"""Operators' tools.

    demo.py    `pilot demo`: the whole system on one machine, live view, baseline and report
    watch.py   `pilot watch RUN_ID`: a live view of any run from its Redis
    certs.py   `pilot certs`: CA, TLS certificates, Redis users per role, SuperNode keys; registration
    local.py   a local run's Flower home and stopping what `flwr run` left running
"""
