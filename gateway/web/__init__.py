"""The HTTP side: the Flask app, TES and legacy routes, events and watch streams, the
dashboard, sessions, headers, and the ops listener.
"""
