"""Who may do what, and how often: authentication (users, tokens, JWT) and rate limits,
shared by the HTTP and gRPC sides.
"""
