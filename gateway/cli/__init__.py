"""The command line (funnel ...): client commands, admin commands, and the server that
wires the rooms together.
"""
