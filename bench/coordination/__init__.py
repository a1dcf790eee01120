"""Coordination with unseen partners: games, learners and partner populations for the ``coordination`` task.

The shift of this workload is the partner: methods train with themselves or with one population of agents and are
tested with agents they have never met (zero-shot coordination).
"""
