"""A site: one persistent trainer per site, alive across rounds.

    trainer.py    the site trainer (python -m pilot.site.trainer, or under torchrun over the site's GPUs)
    watchers.py   rank 0's threads: stop watcher, heartbeat, metrics pusher
    process.py    its process life, without torch: start, find, drain, stop, the one process-tree killer
"""
